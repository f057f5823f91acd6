"""Lab ownership records: claimed exclusively, names confined to the lab's prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netem.errors import NetemError
from netem.lifecycle import down_from_state, recorded_labs
from netem.state import LabState, state_path


def test_create_claims_the_lab_id_exclusively(tmp_path: Path) -> None:
    state = LabState.create(tmp_path / "run", "ab1")
    assert state.path == state_path(tmp_path / "run", "ab1")
    with pytest.raises(NetemError, match="lab 'ab1' is already recorded") as info:
        LabState.create(tmp_path / "run", "ab1")
    assert info.value.errno == 17
    assert "operation: create" in str(info.value)


def test_namespaces_are_recorded_in_order_and_survive_a_reload(tmp_path: Path) -> None:
    state = LabState.create(tmp_path, "ab1")
    state.add_namespace("dp-ab1-sw")
    state.add_namespace("dp-ab1-prefill-0")
    state.add_namespace("dp-ab1-sw")
    loaded = LabState.load(state.path)
    assert loaded.record.namespaces == ["dp-ab1-sw", "dp-ab1-prefill-0"]
    assert loaded.record.token == state.record.token
    state.discard_namespace("dp-ab1-sw")
    assert LabState.load(state.path).record.namespaces == ["dp-ab1-prefill-0"]
    (tmp_path / "ab1.run.json").write_text("{}")  # the runner's own file, not a lab record
    (tmp_path / ".ab1.json.tmp").write_text("{}")
    assert recorded_labs(tmp_path) == ["ab1"]
    state.delete()
    state.delete()
    assert recorded_labs(tmp_path) == []


def test_names_outside_the_lab_prefix_are_refused(tmp_path: Path) -> None:
    state = LabState.create(tmp_path, "ab1")
    with pytest.raises(NetemError, match="outside lab 'ab1'"):
        state.add_namespace("dp-ab2-sw")
    data = json.loads(state.path.read_text())
    data["namespaces"] = ["dp-ab1-sw", "docker-ns", "dp-ab1-x/../../etc"]
    state.path.write_text(json.dumps(data))
    with pytest.raises(NetemError, match=r"refusing namespaces outside dp-ab1-\*"):
        LabState.load(state.path)
    with pytest.raises(NetemError, match="refusing namespaces"):
        down_from_state("ab1", state_dir=tmp_path)
    assert state.path.exists(), "a refused record is kept for a human to look at"


def test_garbage_records_are_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "zz.json").write_text("{not json")
    with pytest.raises(NetemError, match="not JSON"):
        LabState.load(tmp_path / "zz.json")
    (tmp_path / "zz.json").write_text('{"version": 99}')
    with pytest.raises(NetemError, match="not a version-1 lab record"):
        LabState.load(tmp_path / "zz.json")


def test_down_from_state_without_records_is_a_no_op(tmp_path: Path) -> None:
    assert down_from_state(state_dir=tmp_path / "missing") == []
    assert down_from_state("nope", state_dir=tmp_path) == []


def test_down_from_state_drops_records_of_namespaces_that_never_came_to_be(
    tmp_path: Path,
) -> None:
    # A crash between recording a name and creating it leaves a name that does not exist.
    state = LabState.create(tmp_path, "ab1")
    state.add_namespace("dp-ab1-never-created")
    assert down_from_state(state_dir=tmp_path) == []
    assert recorded_labs(tmp_path) == []


def test_objects_made_inside_a_namespace_are_recorded_with_it(tmp_path: Path) -> None:
    state = LabState.create(tmp_path, "ab1")
    state.add_namespace("dp-ab1-sw")
    with pytest.raises(NetemError, match="not recorded"):
        state.set_objects("dp-ab1-prefill-0", ["tc qdisc add dev snic root handle 1:0 htb"])
    state.add_namespace("dp-ab1-prefill-0")
    state.set_objects("dp-ab1-prefill-0", ["tc qdisc add dev snic root handle 1:0 htb"])
    state.set_objects("dp-ab1-sw", ["nft table bridge dualpath, chain forward"])
    loaded = LabState.load(state.path)
    assert loaded.record.objects == {
        "dp-ab1-prefill-0": ["tc qdisc add dev snic root handle 1:0 htb"],
        "dp-ab1-sw": ["nft table bridge dualpath, chain forward"],
    }
    state.discard_namespace("dp-ab1-sw")  # its objects went with it
    assert set(LabState.load(state.path).record.objects) == {"dp-ab1-prefill-0"}
    # Records written before objects were recorded still load.
    data = json.loads(state.path.read_text())
    del data["objects"]
    state.path.write_text(json.dumps(data))
    assert LabState.load(state.path).record.objects == {}


def test_state_directory_follows_the_user() -> None:
    from netem.state import SYSTEM_STATE_DIR, default_state_dir

    run = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/ann"}
    assert default_state_dir({**run, "DUALPATH_STATE_DIR": "/srv/s"}, 1000) == Path("/srv/s")
    assert default_state_dir(run, 0) == SYSTEM_STATE_DIR  # root: the system's
    assert default_state_dir(run, 1000) == Path("/run/user/1000/dualpath")
    no_runtime = {"HOME": "/home/ann", "XDG_RUNTIME_DIR": "relative/ignored"}
    assert default_state_dir(no_runtime, 1000) == Path("/home/ann/.local/state/dualpath")
    state_home = {**no_runtime, "XDG_STATE_HOME": "/home/ann/st"}
    assert default_state_dir(state_home, 1000) == Path("/home/ann/st/dualpath")


def test_state_directory_is_owner_only(tmp_path: Path) -> None:
    from netem.state import ensure_state_dir

    fresh = ensure_state_dir(tmp_path / "a" / "state")
    assert fresh.stat().st_mode & 0o777 == 0o700
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    ensure_state_dir(wide)
    assert wide.stat().st_mode & 0o777 == 0o755  # an existing directory is not changed
    record = LabState.create(wide, "ab1").path
    assert record.stat().st_mode & 0o777 == 0o600  # but the records in it are owner-only
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NetemError, match="DUALPATH_STATE_DIR"):
        ensure_state_dir(blocker / "state")
