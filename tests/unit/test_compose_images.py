"""compose.images without an engine: which hash-tagged images the build script removes (the
newest kept, the current and `latest` never), and the checks made before the engine is asked.
(The engine's side, import, build, tag and removal: tests/e2e/test_images.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from compose import images
from compose.engine import ComposeError

REPO = "dualpath-mesh"


def _image(created: int, *tags: str) -> dict[str, object]:
    return {"Created": created, "RepoTags": [f"{REPO}:{t}" for t in tags]}


FOUND = [
    _image(300, "c3", "latest"),
    _image(100, "a1"),
    _image(400, "current"),
    _image(200, "b2", "b2-again"),  # one image, two tags
    {"Created": 250, "RepoTags": ["someone-else:z9"]},
    {"Created": 50, "RepoTags": None},  # an untagged image: nothing to remove by name
]


def test_the_newest_are_kept_with_the_current_one_counting_among_them() -> None:
    older = images.select_older(FOUND, repo=REPO, keep=3, current="current")
    # newest first: current (kept, counts), c3 (kept), b2 (kept); then b2-again, a1
    assert older == ["b2-again", "a1"]


def test_keep_one_keeps_only_the_current_image_and_latest() -> None:
    older = images.select_older(FOUND, repo=REPO, keep=1, current="current")
    assert older == ["c3", "b2", "b2-again", "a1"]
    assert "latest" not in older and "current" not in older


def test_nothing_to_remove_when_there_are_no_more_than_keep() -> None:
    assert images.select_older(FOUND, repo=REPO, keep=10, current="current") == []


def test_a_tarball_that_is_not_there_is_named_before_the_engine_is_asked(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "root.tar"
    with pytest.raises(ComposeError, match=f"image dualpath-base:x: no tarball {missing}"):
        images.import_rootfs(missing, "dualpath-base:x")


def test_the_command_line_refuses_a_build_argument_without_a_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert images.main(["build", "x:y", "--build-arg", "BASE_IMAGE"]) == 1
    assert "--build-arg 'BASE_IMAGE': expected NAME=VALUE" in capsys.readouterr().err
