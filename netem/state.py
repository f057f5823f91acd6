"""Ownership records of netns labs: one JSON file per lab under the state directory.

A namespace is recorded *before* it is created, so a crash leaves a record that `down` can
act on; `down` removes only names recorded there, and only names under the lab's own prefix
(`dp-<lab_id>-`), so a damaged file can never point it at someone else's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from errno import EEXIST
from pathlib import Path
from typing import Any

from netem.errors import NetemError
from netem.plan import NAMESPACE_PREFIX

STATE_VERSION = 1
SUFFIX = ".json"
_RECORD_NAME = re.compile(r"[a-z0-9]{1,8}\.json")


SYSTEM_STATE_DIR = Path("/run/dualpath")
STATE_DIR_MODE = 0o700
RECORD_MODE = 0o600


def default_state_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """Where lab records live: `$DUALPATH_STATE_DIR` if set; for root /run/dualpath; for
    anyone else their own runtime directory (`$XDG_RUNTIME_DIR/dualpath`), or without one
    `$XDG_STATE_HOME/dualpath` (default ~/.local/state/dualpath). Pure: no file is touched."""
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    explicit = env.get("DUALPATH_STATE_DIR")
    if explicit:
        return Path(explicit)
    if euid == 0:
        return SYSTEM_STATE_DIR
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return Path(runtime) / "dualpath"
    state_home = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state_home):
        return Path(state_home) / "dualpath"
    return Path(env.get("HOME") or os.path.expanduser("~")) / ".local" / "state" / "dualpath"


def ensure_state_dir(state_dir: Path) -> Path:
    """Create `state_dir` readable by its owner only (the records name processes, files and
    control URLs; the record files themselves are 0600 wherever they are). An existing
    directory is used as it is: `DUALPATH_STATE_DIR` may name one that is not the lab's to
    change. NetemError if it cannot be made, naming it and the variable that moves it."""
    try:
        state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(state_dir))
    except OSError as exc:
        raise NetemError(
            f"cannot use the state directory {state_dir} ({exc.strerror or exc}): set "
            "DUALPATH_STATE_DIR to a directory you can write",
            operation=f"mkdir {state_dir}",
            errno=exc.errno,
        ) from exc
    return state_dir


def write_record(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a hidden temporary file, fsync, rename), readable
    by its owner only. OSError as raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, RECORD_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def state_path(state_dir: Path, lab_id: str) -> Path:
    return state_dir / f"{lab_id}{SUFFIX}"


def lab_prefix(lab_id: str) -> str:
    return f"{NAMESPACE_PREFIX}{lab_id}-"


@dataclass
class LabRecord:
    """What one lab created. `token` ties the file to the NetnsLab object that wrote it."""

    lab_id: str
    token: str
    pid: int
    created_at: float
    namespaces: list[str] = field(default_factory=list)
    objects: dict[str, list[str]] = field(default_factory=dict)
    """namespace -> the kernel objects the lab made inside it (qdiscs, classes, filters, IFBs,
    nft table and rules), in tc/nft words. For inspection: they all go with their namespace,
    which `down` removes, so nothing else needs deleting one by one."""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "lab_id": self.lab_id,
            "token": self.token,
            "pid": self.pid,
            "created_at": self.created_at,
            "namespaces": list(self.namespaces),
            "objects": {ns: list(items) for ns, items in self.objects.items()},
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> LabRecord:
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise NetemError(f"{where}: not a version-{STATE_VERSION} lab record")
        lab_id = data.get("lab_id")
        names = data.get("namespaces")
        if not isinstance(lab_id, str) or not isinstance(names, list):
            raise NetemError(f"{where}: lab record without lab_id/namespaces")
        prefix = lab_prefix(lab_id)
        bad = [n for n in names if not isinstance(n, str) or not n.startswith(prefix) or "/" in n]
        if bad:
            raise NetemError(f"{where}: refusing namespaces outside {prefix}*: {bad}")
        objects = data.get("objects", {})
        if not isinstance(objects, dict):
            raise NetemError(f"{where}: 'objects' is not a mapping")
        return cls(
            lab_id=lab_id,
            token=str(data.get("token", "")),
            pid=int(data.get("pid", 0)),
            created_at=float(data.get("created_at", 0.0)),
            namespaces=[str(n) for n in names],
            objects={str(ns): [str(i) for i in items] for ns, items in objects.items()},
        )


class LabState:
    """The record file of one lab, rewritten atomically (write + rename) on every change."""

    def __init__(self, path: Path, record: LabRecord) -> None:
        self.path = path
        self.record = record

    @classmethod
    def create(cls, state_dir: Path, lab_id: str) -> LabState:
        """Claim `lab_id`: fails closed (NetemError) if a record for it already exists."""
        path = state_path(state_dir, lab_id)
        ensure_state_dir(state_dir)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, RECORD_MODE)
        except FileExistsError:
            raise NetemError(
                f"lab {lab_id!r} is already recorded in {path}: run `dualpath down` "
                "(or down_from_state) first, or pick another lab_id",
                operation=f"create {path}",
                errno=EEXIST,
            ) from None
        except OSError as exc:
            raise NetemError(
                f"cannot write lab record {path}", operation=f"create {path}", errno=exc.errno
            ) from exc
        os.close(fd)
        state = cls(path, LabRecord(lab_id, secrets.token_hex(8), os.getpid(), time.time()))
        state.save()
        return state

    @classmethod
    def load(cls, path: Path) -> LabState:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise NetemError(
                f"cannot read lab record {path}", operation=f"read {path}", errno=exc.errno
            ) from exc
        except json.JSONDecodeError as exc:
            raise NetemError(f"{path}: not JSON ({exc})", operation=f"read {path}") from exc
        return cls(path, LabRecord.from_json(data, where=str(path)))

    def save(self) -> None:
        try:
            write_record(self.path, json.dumps(self.record.to_json(), indent=2) + "\n")
        except OSError as exc:
            raise NetemError(
                f"cannot write lab record {self.path}",
                operation=f"write {self.path}",
                errno=exc.errno,
            ) from exc

    def add_namespace(self, name: str) -> None:
        if not name.startswith(lab_prefix(self.record.lab_id)):
            raise NetemError(f"namespace {name!r} is outside lab {self.record.lab_id!r}")
        if name not in self.record.namespaces:
            self.record.namespaces.append(name)
            self.save()

    def discard_namespace(self, name: str) -> None:
        if name in self.record.namespaces:
            self.record.namespaces.remove(name)
            self.record.objects.pop(name, None)
            self.save()

    def set_objects(self, namespace: str, items: list[str]) -> None:
        """Record what the lab made inside one of its namespaces (replacing the old list)."""
        if namespace not in self.record.namespaces:
            raise NetemError(f"namespace {namespace!r} is not recorded for this lab")
        self.record.objects[namespace] = list(items)
        self.save()

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def recorded_paths(state_dir: Path) -> list[Path]:
    """Lab records in `state_dir`: `<lab_id>.json` only, so other files that share the
    directory (e.g. the runner's `<lab_id>.run.json`) are never mistaken for one."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.iterdir() if _RECORD_NAME.fullmatch(p.name) and p.is_file())
