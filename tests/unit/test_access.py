"""The lab's secret and what a lab records about itself: tokens compared as they must be, secret
files made whole and private, specs written 0600 with a checked lab id, data directories
removed only while they are the ones the lab made, and compose records that could name
someone else's stack refused."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from compose.backend import ComposeError, down_stack
from lab.cli import build_parser
from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from lab.run.backends import DataDir, RunState, down_recorded, make_data_dir
from services.auth import SecretError, bearer, new_secret, presented, shared_secret
from services.spec import ClusterSpec

SECRET = new_secret()


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (bearer(SECRET), True),
        (f"bearer {SECRET}", True),
        (f"Bearer  {SECRET} ", True),
        (None, False),
        ("", False),
        ("Bearer", False),
        (SECRET, False),
        (f"Basic {SECRET}", False),
        (f"Bearer {SECRET[:-1]}", False),
        (f"Bearer {SECRET}0", False),
        (bearer(new_secret()), False),
    ],
)
def test_only_the_secret_as_a_bearer_token_is_presented(value: str | None, ok: bool) -> None:
    assert presented(value, SECRET) is ok


def test_an_empty_secret_lets_nothing_in() -> None:
    assert not presented("Bearer ", "")
    assert not presented(bearer(""), "")


def test_a_secret_file_is_made_once_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "agent"
    first = shared_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert shared_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["agent"]  # no temporary file left


def test_services_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "agent"
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(shared_secret(path))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16 and len(set(got)) == 1


@pytest.mark.parametrize("kind", ["readable", "garbage", "directory", "symlink"])
def test_a_secret_file_that_cannot_be_trusted_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "agent"
    if kind == "readable":
        path.write_text(new_secret())
        path.chmod(0o644)
    elif kind == "garbage":
        path.write_text("not a secret\n")
        path.chmod(0o600)
    elif kind == "directory":
        path.mkdir()
    else:
        target = tmp_path / "elsewhere"
        target.write_text(new_secret())
        target.chmod(0o600)
        path.symlink_to(target)
    with pytest.raises(SecretError, match="agent"):
        shared_secret(path)


def _spec(tmp_path: Path, lab_id: str = "abc123") -> ClusterSpec:
    cfg = parse_config({"name": "t"})
    return build_cluster_spec(cfg, lab_id=lab_id, backend="netns", data_dir=tmp_path)


def test_every_spec_gets_its_own_secret_written_owner_only(tmp_path: Path) -> None:
    a, b = _spec(tmp_path), _spec(tmp_path)
    assert a.secret != b.secret and presented(bearer(a.secret), a.secret)
    assert a.secret not in repr(a)
    path = tmp_path / "spec.json"
    a.dump(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ClusterSpec.load(path).secret == a.secret


@pytest.mark.parametrize("lab_id", ["", "../x", "a/b", "ABC", "toolong99", "a b", "a-b"])
def test_a_spec_with_a_lab_id_that_is_not_one_is_refused(tmp_path: Path, lab_id: str) -> None:
    data = json.loads(_spec(tmp_path).model_dump_json()) | {"lab_id": lab_id}
    with pytest.raises(ValidationError, match="lab_id"):
        ClusterSpec.model_validate(data)


def test_a_data_directory_is_made_private_with_an_unpredictable_name(tmp_path: Path) -> None:
    a, b = make_data_dir("abc", tmp_path), make_data_dir("abc", tmp_path)
    assert a.path != b.path and a.path.parent == tmp_path
    assert a.path.name.startswith("dualpath-abc-")
    assert a.path.stat().st_mode & 0o777 == 0o700


def test_a_data_directory_is_removed_only_while_it_is_the_one_made(tmp_path: Path) -> None:
    made = make_data_dir("abc", tmp_path)
    (made.path / "blocks").write_text("x")
    assert made.remove() and not made.path.exists()
    # the same name, made again by someone else (the file system may even hand the same inode
    # back): not the lab's any more
    made.path.mkdir()
    (made.path / "theirs").write_text("x")
    assert not made.remove() and (made.path / "theirs").exists()
    # a forged mark does not make it the lab's either: the token is the record's
    (made.path / ".dualpath-owner").write_text("f" * 32)
    assert not made.remove()
    # a link in its place: never followed
    other = make_data_dir("abc", tmp_path)
    target = tmp_path / "results"
    target.mkdir()
    shutil.rmtree(other.path)
    other.path.symlink_to(target)
    assert not other.remove() and target.is_dir()


def test_down_never_deletes_a_directory_a_record_names_by_path_alone(tmp_path: Path) -> None:
    results = tmp_path / "dualpath-results"  # the prefix down used to trust
    results.mkdir()
    (results / "summary.json").write_text("{}")
    st = results.stat()
    records = {
        "a1": str(results),  # the old form: a bare path
        "a2": DataDir(results, st.st_dev, st.st_ino, "0" * 32).to_json(),  # no token there
        "a3": {"path": "relative/dir", "dev": st.st_dev, "ino": st.st_ino},
    }
    for lab_id, data_dir in records.items():
        state = RunState(lab_id, "local", tmp_path / "spec.json", None)
        state.data["data_dir"] = data_dir
        state.save()
    down_recorded()
    assert (results / "summary.json").read_text() == "{}"
    assert not list((tmp_path / "state").glob("*.run.json"))


@pytest.mark.parametrize(
    ("lab_id", "project"),
    [("abc", "someone-else"), ("abc", None), ("../x", "dualpath-../x"), ("ABC", "dualpath-ABC")],
)
def test_a_compose_record_that_could_name_another_stack_is_refused(
    lab_id: str, project: str | None
) -> None:
    record = {"lab_id": lab_id, "compose": {"project": project, "file": "/nonexistent"}}
    with pytest.raises(ComposeError, match="refusing"):
        down_stack(record)


@pytest.mark.parametrize(
    "argv",
    [
        ["down", "--lab", "../etc"],
        ["exec", "--lab", "ABC", "prefill-0", "--", "true"],
        ["exec", "../x", "--", "true"],
        ["link", "set", "prefill-0/../x", "snic", "rate=1%"],
        ["node", "decode-0;x", "kill"],
    ],
)
def test_the_cli_refuses_ids_that_could_reach_a_path_or_a_url(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 2
    assert "is not a" in capsys.readouterr().err
