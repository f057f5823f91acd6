"""The lab's shared secret: how it is made, stored, presented and checked.

Every mutating surface of a lab (scheduler gRPC and HTTP, the lab control endpoint, the compose
agents) requires the lab's secret as a bearer token; this module is the one place that says
what a token looks like and compares it in constant time. No sockets, no servers.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dualpath.errors import DualPathError

if TYPE_CHECKING:  # aiohttp only where a server uses the middleware: the pure cores import
    from aiohttp import web  # this module through services.spec
    from aiohttp.typedefs import Middleware

SECRET_BYTES = 32
"""Random bytes behind a secret (`secrets.token_urlsafe`: 43 URL-safe characters)."""
SECRET_PATTERN = r"^[A-Za-z0-9_-]{32,128}$"
"""What a secret may look like wherever it is read back (spec, state or secret file)."""
_SECRET = re.compile(SECRET_PATTERN)
AUTH_HEADER = "Authorization"
GRPC_AUTH_KEY = "authorization"
"""gRPC metadata keys are lower case."""
FILE_MODE = 0o600


class SecretError(DualPathError):
    """A secret file cannot be made, read or trusted; the message names the file and why."""


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def bearer(secret: str) -> str:
    """The value of an `Authorization` header (or gRPC metadata) that presents `secret`."""
    return f"Bearer {secret}"


def presented(value: str | None, secret: str) -> bool:
    """Whether an `Authorization` value presents `secret`: constant time in the value's
    content, and never true for an empty secret (a lab without one is closed, not open)."""
    if not value or not secret:
        return False
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), secret.encode())


FRAME_AUTH_FIELD = "auth"
"""The frame header field in which a storage `seed` or `write` presents the lab's secret."""


def frame_presents(token: object, secret: str) -> bool:
    """Whether a frame header's FRAME_AUTH_FIELD value is `secret` (constant time; never true
    for an empty secret or a value that is not a string)."""
    if not isinstance(token, str) or not token or not secret:
        return False
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), secret.encode())


REFUSAL = "the lab's secret is required (Authorization: Bearer <secret>)"

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


def bearer_middleware(secret: str, *, open_reads: frozenset[str] = frozenset()) -> Middleware:
    """aiohttp middleware: every request must present `secret`, except GET/HEAD of the paths
    in `open_reads`; a refused one is answered 401 with a problem body (RFC 9457) before its
    body is read, and its connection is closed."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") and request.path in open_reads:
            return await handler(request)
        if presented(request.headers.get(AUTH_HEADER), secret):
            return await handler(request)
        detail = f"{request.method} {request.path}: {REFUSAL}"
        body = {"type": "about:blank", "title": "unauthorized", "status": 401, "detail": detail}
        return web.Response(
            status=401,
            text=json.dumps(body),
            content_type="application/problem+json",
            headers={"WWW-Authenticate": 'Bearer realm="dualpath"', "Connection": "close"},
        )

    return middleware


def shared_secret(path: Path) -> str:
    """The secret in `path`, made first if the file does not exist yet (0600, created whole
    and atomically, so processes that start together all read the one that was made first).
    SecretError when the file is not a regular file of this user readable by nobody else,
    or holds no valid secret."""
    if not path.exists():
        _create(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SecretError(f"cannot read the secret file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise SecretError(f"{path}: not a regular file owned by uid {os.geteuid()}")
        if st.st_mode & 0o077:
            raise SecretError(
                f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the secret "
                "(it must be 0600)"
            )
        text = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not _SECRET.fullmatch(text):
        raise SecretError(f"{path}: does not hold a secret (32-128 URL-safe characters)")
    return text


def _create(path: Path) -> None:
    """Write a new secret to a private temporary file, then link it into place: the name
    appears with its whole content or not at all, and a file someone made first wins."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            fh.write(new_secret() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as exc:
        raise SecretError(f"cannot create the secret file {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


__all__ = [
    "AUTH_HEADER",
    "GRPC_AUTH_KEY",
    "REFUSAL",
    "SECRET_PATTERN",
    "SecretError",
    "bearer",
    "bearer_middleware",
    "new_secret",
    "presented",
    "shared_secret",
]
