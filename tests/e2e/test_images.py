"""The image build's engine steps (compose.images, which compose/build-base.sh and
build-image.sh run) on a real engine: a root tarball imported with Dockerfile changes, a build
with build arguments, labels and no network, a failed build named with the engine's reason,
tagging, and the removal of older hash-tagged images, one that a container uses kept with the
engine's refusal. Everything is made under a repository name of the test's own and removed by
the ids recorded here.
"""

from __future__ import annotations

import contextlib
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose import engine, images
from compose.engine import EngineError

SOURCE_LABEL = "com.dualpath.source"


class Made:
    """The images and containers this test made (ids), removed at the end, and nothing else."""

    def __init__(self) -> None:
        self.repo = "dualpath-e2e-img-" + secrets.token_hex(3)
        self.images: list[str] = []
        self.containers: list[str] = []

    def image(self, ident: str) -> str:
        self.images.append(ident)
        return ident

    def remove(self) -> None:
        for cid in self.containers:
            with contextlib.suppress(EngineError):
                engine.remove("container", cid)
        for ident in reversed(self.images):
            with contextlib.suppress(EngineError), engine.engine_errors(f"image {ident}"):
                engine.client().api.remove_image(ident, force=True)


@pytest.fixture
def made(image: str) -> Iterator[Made]:
    """Once the engine answers (the `image` fixture says how it fails otherwise)."""
    made = Made()
    try:
        yield made
    finally:
        made.remove()


def _rootfs(path: Path, text: str) -> Path:
    """A root filesystem tarball with one file, /hello.txt."""
    (path.parent / "hello.txt").write_text(text)
    with tarfile.open(path, "w") as tar:
        tar.add(path.parent / "hello.txt", arcname="hello.txt")
    return path


def _inspect(ident: str) -> dict[str, object]:
    with engine.engine_errors(f"image {ident}"):
        return dict(engine.client().api.inspect_image(ident))


def test_a_root_tarball_is_imported_with_its_changes(made: Made, tmp_path: Path) -> None:
    name = f"{made.repo}:base"
    ident = made.image(
        images.import_rootfs(
            _rootfs(tmp_path / "root.tar", "hi"),
            name,
            changes=["ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]'],
        )
    )
    found = _inspect(name)
    assert found["Id"] == ident
    config = found["Config"]
    assert isinstance(config, dict)
    assert "LANG=C.UTF-8" in config["Env"] and config["Cmd"] == ["/bin/bash"]
    with pytest.raises(EngineError, match=f"image {made.repo}:bad .*Error processing tar"):
        images.import_rootfs(tmp_path / "hello.txt", f"{made.repo}:bad")  # not a tarball


def test_a_build_has_its_arguments_labels_and_no_network(
    made: Made, image: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nARG GREETING\n"
        'RUN echo "$GREETING" > /greeting && ls /sys/class/net > /nets\n'
    )
    name = f"{made.repo}:built"
    ident = made.image(
        images.build(
            name,
            context=tmp_path,
            dockerfile="Dockerfile",
            buildargs={"BASE_IMAGE": image, "GREETING": "kv bytes"},
            labels={SOURCE_LABEL: "e2e"},
            network_mode="none",
        )
    )
    assert _inspect(name)["Id"] == ident
    labels = _inspect(ident)["Config"]
    assert isinstance(labels, dict) and labels["Labels"][SOURCE_LABEL] == "e2e"
    with engine.engine_errors(f"a container of {name}"):
        shown = engine.client().containers.run(
            ident, entrypoint=["cat", "/greeting", "/nets"], network_mode="none", remove=True
        )
    # the RUN step had loopback only
    assert shown == b"kv bytes\nlo\n"
    images.tag(ident, f"{made.repo}:latest")
    assert _inspect(f"{made.repo}:latest")["Id"] == ident

    (tmp_path / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo no-such-step && exit 3\n"
    )
    with pytest.raises(EngineError) as info:
        images.build(
            f"{made.repo}:broken",
            context=tmp_path,
            dockerfile="Dockerfile",
            buildargs={"BASE_IMAGE": image},
            network_mode="none",
        )
    text = str(info.value)
    assert text.startswith(f"image {made.repo}:broken: the Docker engine's build failed")
    assert "returned a non-zero code: 3" in text and "no-such-step" in text


def test_older_images_go_and_one_a_container_uses_stays(made: Made, tmp_path: Path) -> None:
    tags = ["old1", "old2", "inuse", "current"]
    for i, name in enumerate(tags):
        made.image(
            images.import_rootfs(
                _rootfs(tmp_path / f"{name}.tar", name),
                f"{made.repo}:{name}",
                changes=[f"LABEL {SOURCE_LABEL}={name}"],
            )
        )
        if i == 0:
            images.tag(f"{made.repo}:{name}", f"{made.repo}:latest")
    with engine.engine_errors(f"a container of {made.repo}:inuse"):
        cid = engine.client().api.create_container(f"{made.repo}:inuse", command=["none"])["Id"]
    made.containers.append(str(cid))

    removed, refused = images.prune(made.repo, label=SOURCE_LABEL, keep=1, current="current")

    assert sorted(removed) == [f"{made.repo}:old1", f"{made.repo}:old2"]
    (why,) = refused
    assert why.startswith(f"image {made.repo}:inuse: the Docker engine refused (HTTP 409)")
    assert cid[:12] in why  # the engine names the container that uses it
    left = {
        tag
        for found in engine.client().api.images(name=made.repo)
        for tag in found.get("RepoTags") or []
    }
    # old1's image keeps its `latest` tag: only the hash tag went
    assert left == {f"{made.repo}:{t}" for t in ("inuse", "current", "latest")}
