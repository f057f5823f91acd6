"""The engine's side of building the lab's images, through its API (the Docker SDK): import a
root filesystem tarball, build the Dockerfile (classic builder, optionally with no network),
tag, and remove the older hash-tagged images of a repository.

compose/build-base.sh and compose/build-image.sh do the rest (debootstrap, the wheelhouse) in
shell and run this module for these steps (`python -m compose.images VERB ...`). It decides
nothing about which image to build; every error names the image and the engine's cause.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compose.engine import ComposeError, EngineError, client, engine_errors, image_exists

LOG_LINES = 20
"""How many of the build's last output lines an error shows."""


def import_rootfs(tarball: Path, image: str, *, changes: Sequence[str] = ()) -> str:
    """Import a root filesystem tarball as `image` (repo:tag), with Dockerfile instructions
    (`ENV ...`, `CMD [...]`) applied as `docker import --change` does; the image's id."""
    repo, tag = _split(image)
    if not tarball.is_file():  # the SDK would take the path for a URL
        raise ComposeError(f"image {image}: no tarball {tarball} to import")
    with engine_errors(f"image {image} (import of {tarball})"):
        answer = client().api.import_image(
            src=str(tarball), repository=repo, tag=tag, changes=list(changes)
        )
    # one JSON object per line; the engine reports a failure half-way in the stream
    status = ""
    for message in _messages(str(answer).splitlines()):
        if "error" in message:
            raise EngineError(
                f"image {image}: the Docker engine could not import {tarball}: {_error(message)}"
            )
        status = str(message.get("status", status))
    return status


def build(
    image: str,
    *,
    context: Path,
    dockerfile: str,
    buildargs: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    network_mode: str | None = None,
) -> str:
    """Build `dockerfile` (relative to `context`) as `image` with the engine's classic builder
    (what `DOCKER_BUILDKIT=0 docker build` uses), intermediate containers removed, with
    `network_mode` ("none": the RUN steps get no network); the image's id. A failed step
    raises EngineError with the engine's error and the build's last output lines."""
    what = f"image {image}"
    shown: deque[str] = deque(maxlen=LOG_LINES)
    built = ""
    with engine_errors(what):
        stream: Iterable[Any] = client().api.build(
            path=str(context),
            dockerfile=dockerfile,
            tag=image,
            buildargs=dict(buildargs or {}),
            labels=dict(labels or {}),
            network_mode=network_mode,
            rm=True,
            forcerm=True,
            decode=True,
        )
        for message in stream:
            if not isinstance(message, dict):
                continue
            if "error" in message:
                log = "\n".join(shown)
                raise EngineError(
                    f"{what}: the Docker engine's build failed: {_error(message)}\n"
                    f"(the build's last lines:)\n{log}"
                )
            shown.extend(line for line in str(message.get("stream", "")).splitlines() if line)
            aux = message.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                built = str(aux["ID"])
    if not built:
        raise EngineError(f"{what}: the Docker engine's build ended without an image id")
    return built


def tag(image: str, target: str) -> None:
    """Tag `image` (a name or id) also as `target` (repo:tag), moving the tag if it exists."""
    repo, name = _split(target)
    with engine_errors(f"image {image} (tag {target})"):
        if not client().api.tag(image, repo, name, force=True):
            raise EngineError(f"image {image}: the Docker engine did not tag it {target}")


def older_tags(repo: str, *, label: str, keep: int, current: str) -> list[str]:
    """Tags of `repo`'s images that carry `label` beyond the `keep` newest (select_older)."""
    with engine_errors(f"images of {repo} labelled {label}"):
        found = client().api.images(name=repo, filters={"label": label})
    return select_older(found, repo=repo, keep=keep, current=current)


def select_older(
    found: Iterable[Mapping[str, Any]], *, repo: str, keep: int, current: str
) -> list[str]:
    """Of the engine's image list `found` (Created, RepoTags), the tags of `repo` beyond the
    `keep` newest, newest first: `current` counts among the kept ones and, like `latest`,
    is never listed."""
    tags = [
        t.split(":", 1)[1]
        for image in sorted(found, key=lambda i: int(i.get("Created", 0)), reverse=True)
        for t in image.get("RepoTags") or []
        if t.startswith(f"{repo}:")
    ]
    others = [t for t in tags if t not in ("latest", current)]
    return others[max(keep - 1, 0) :]


def prune(repo: str, *, label: str, keep: int, current: str) -> tuple[list[str], list[str]]:
    """Remove the tags `older_tags` lists (the image goes with its last tag). An image a
    container still uses is kept: the engine refuses, and the refusal is returned.
    (removed `repo:tag`s, refusals naming the image and the engine's reason)"""
    removed: list[str] = []
    refused: list[str] = []
    for name in older_tags(repo, label=label, keep=keep, current=current):
        image = f"{repo}:{name}"
        try:
            with engine_errors(f"image {image}"):
                client().api.remove_image(image)
            removed.append(image)
        except EngineError as exc:
            refused.append(str(exc))
    return removed, refused


def _split(image: str) -> tuple[str, str]:
    """repo:tag -> (repo, tag); the tag defaults to latest (a registry's host:port is part
    of the repository)."""
    repo, sep, name = image.rpartition(":")
    if not sep or "/" in name:
        return image, "latest"
    return repo, name


def _messages(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    for line in lines:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(message, dict):
            yield message


def _error(message: Mapping[str, Any]) -> str:
    detail = message.get("errorDetail")
    text = detail.get("message") if isinstance(detail, dict) else None
    return str(text or message.get("error")).strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compose.images",
        description="The Docker engine's steps of compose/build-base.sh and build-image.sh.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    exists = verbs.add_parser("exists", help="print yes or no: whether the engine has IMAGE")
    exists.add_argument("image")
    imp = verbs.add_parser("import", help="import a root filesystem tarball as IMAGE")
    imp.add_argument("tarball", type=Path)
    imp.add_argument("image")
    imp.add_argument("--change", action="append", default=[], help="e.g. 'ENV LANG=C.UTF-8'")
    bld = verbs.add_parser("build", help="build IMAGE from a Dockerfile (classic builder)")
    bld.add_argument("image")
    bld.add_argument("--context", type=Path, default=Path("."))
    bld.add_argument("--file", default="Dockerfile", help="relative to the context")
    bld.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    bld.add_argument("--label", action="append", default=[], metavar="NAME=VALUE")
    bld.add_argument("--network", default=None, help="the RUN steps' network (none: none)")
    tg = verbs.add_parser("tag", help="tag IMAGE also as TARGET")
    tg.add_argument("image")
    tg.add_argument("target")
    pr = verbs.add_parser("prune", help="remove REPO's older hash-tagged images")
    pr.add_argument("repo")
    pr.add_argument("--label", required=True, help="only images carrying this label")
    pr.add_argument("--keep", type=int, required=True, help="how many to keep, CURRENT one")
    pr.add_argument("--current", required=True, help="the tag just built (always kept)")
    return parser


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ComposeError(f"{option} {item!r}: expected NAME=VALUE")
        pairs[key] = value
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """The scripts' entry point: 0 when done, 1 with the error on stderr."""
    args = _parser().parse_args(argv)
    try:
        if args.verb == "exists":
            print("yes" if image_exists(args.image) else "no")
        elif args.verb == "import":
            import_rootfs(args.tarball, args.image, changes=args.change)
        elif args.verb == "build":
            build(
                args.image,
                context=args.context,
                dockerfile=args.file,
                buildargs=_pairs(args.build_arg, "--build-arg"),
                labels=_pairs(args.label, "--label"),
                network_mode=args.network,
            )
        elif args.verb == "tag":
            tag(args.image, args.target)
        else:
            removed, refused = prune(
                args.repo, label=args.label, keep=args.keep, current=args.current
            )
            for line in [f"removed {image}" for image in removed] + [
                f"kept {why}" for why in refused
            ]:
                print(f"[images] {line}", file=sys.stderr)
    except ComposeError as exc:
        print(f"[images] {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build", "import_rootfs", "main", "older_tags", "prune", "select_older", "tag"]

if __name__ == "__main__":
    sys.exit(main())
