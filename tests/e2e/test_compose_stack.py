"""The compose stack on a real Docker engine, end to end.

- the README's path: a rendered file, `compose up --exit-code-from driver`: basic and dualpath
  on the small config, every byte verified, DualPath ahead of Basic; `compose down` leaves no
  container, network or volume of the lab;
- `dualpath chaos --backend compose`: link changes and node actions inside the containers,
  `dualpath link set` and `dualpath exec` forwarded into the running stack;
- a node container without NET_ADMIN exits at once, saying what to add.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from stack_helpers import ROOT, RUN_TIMEOUT_S, SMALL, dualpath, nothing_left, render, subnets

from compose import engine
from compose.agent import EXIT_NO_NET_ADMIN
from compose.backend import run_cmd
from compose.render import LAB_LABEL, NODE_LABEL
from lab.run.backends import BackendError

SCENARIO = Path(__file__).with_name("snic-dip.yaml")


def _down(compose: tuple[str, ...], project: str, file: Path) -> None:
    run_cmd([*compose, "-p", project, "-f", str(file), "down", "-v", "--remove-orphans", "-t", "5"])


def test_compose_up_runs_basic_and_dualpath(
    compose: tuple[str, ...], image: str, lab_name: str, tmp_path: Path
) -> None:
    file = tmp_path / "docker-compose.yml"
    render(file, lab_name, image=image, policies="basic,dualpath")
    log = tmp_path / "up.log"
    try:
        with log.open("w") as sink:
            up = subprocess.run(
                [*compose, "-p", lab_name, "-f", str(file), "up", "--exit-code-from", "driver"],
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT_S,
                check=False,
            )
        assert up.returncode == 0, log.read_text()[-4000:]
    finally:
        _down(compose, lab_name, file)
    nothing_left(lab_name)
    (path,) = (tmp_path / "results").glob(f"{lab_name}-compare-*/comparison.json")
    cmp = json.loads(path.read_text())
    runs = cmp["runs"]
    assert set(runs) == {"basic", "dualpath"}
    for summary in runs.values():
        assert summary["backend"] == "compose"
        assert summary["errors"] == [] and summary["turns_failed"] == 0
        assert summary["turns_done"] == 256
        assert summary["bytes_accounted"] and summary["bytes_verified"] > 0
    assert cmp["jct_s"]["dualpath"] < cmp["jct_s"]["basic"]
    # Kernel counters from inside the containers: only DualPath reads through decode-0's snic.
    decode_snic = {p: runs[p]["nics"]["decode-0"]["snic"]["ingress_util"] for p in runs}
    assert decode_snic["dualpath"] > 0.2 > 0.05 > decode_snic["basic"]
    assert (path.parent / "dualpath" / "logs" / "prefill-0.log").stat().st_size > 0


def _wait_for(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(1.0)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def test_chaos_and_control_reach_into_the_containers(
    compose: tuple[str, ...], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    state = tmp_path / "state"
    argv = [
        sys.executable, "-m", "lab.cli", "chaos", "-c", str(SMALL), "--backend", "compose",
        "--policy", "dualpath", "--scenario", str(SCENARIO), "--out", str(out), "-q", *subnets(),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:

        def record() -> dict[str, Any] | None:
            for path in state.glob("*.run.json"):
                data: dict[str, Any] = json.loads(path.read_text())
                if data.get("compose", {}).get("containers"):
                    return data
            return None

        lab = _wait_for("the compose lab's record", record, 300)

        def link_set() -> subprocess.CompletedProcess[str] | None:
            done = dualpath("link", "set", "prefill-0", "cnic", "rate=90%")
            return done if done.returncode == 0 else None

        changed = _wait_for("dualpath link set through the driver", link_set, 240)
        assert "prefill-0/cnic: rate_mbit=360" in changed.stdout
        every_nic = "for d in $(ls /sys/class/net); do tc class show dev $d; done"
        shown = dualpath("exec", "prefill-0", "--", "sh", "-c", every_nic)
        assert shown.returncode == 0, shown.stderr
        assert "rate 360Mbit" in shown.stdout
        # through the engine's exec: stdin in, stdout and stderr apart, the exit status out
        piped = dualpath(
            "exec", "prefill-0", "--", "sh", "-c", "tr a-z A-Z; echo gone >&2; exit 7",
            stdin="kv bytes\n",
        )  # fmt: skip
        assert (piped.returncode, piped.stdout, piped.stderr) == (7, "KV BYTES\n", "gone\n")
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "compose" and summary["errors"] == []
    assert summary["bytes_accounted"]
    events = summary["chaos"]["events"]
    assert len(events) == 4 and all("error" not in e for e in events), events
    links = [e["result"] for e in events if "nic" in e]
    assert all("kernel changes in its container" in r for r in links)
    assert "prefill-0/snic: rate_mbit=25" in links[0]
    assert any(e.get("action") == "stop" and "decode-0 stop" in e["result"] for e in events)
    assert not list(state.glob("*.run.json"))
    nothing_left(str(lab["lab_id"]))


def test_a_node_without_net_admin_exits_with_a_clear_message(
    compose: tuple[str, ...], image: str, lab_name: str, tmp_path: Path
) -> None:
    file = tmp_path / "docker-compose.yml"
    render(file, lab_name, image=image, policies="dualpath")
    doc = yaml.safe_load(file.read_text())
    del doc["services"]["prefill-0"]["cap_add"]
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        run_cmd([*compose, "-p", lab_name, "-f", str(file), "up", "-d", "prefill-0"])
        (cid,) = engine.ids("container", {LAB_LABEL: lab_name, NODE_LABEL: "prefill-0"})

        def exited() -> dict[str, Any] | None:
            st = engine.states({"prefill-0": cid})["prefill-0"]
            return None if st["Running"] else st

        st = _wait_for("prefill-0 to exit", exited, 120)
        text = engine.logs(cid, name="prefill-0").decode()
    finally:
        _down(compose, lab_name, file)
    assert st["ExitCode"] == EXIT_NO_NET_ADMIN
    assert "prefill-0: this container lacks CAP_NET_ADMIN" in text
    assert "cap_add: [NET_ADMIN]" in text
    nothing_left(lab_name)


def test_engine_errors_name_the_container_and_the_cause(image: str) -> None:
    """What the engine answers about a container it does not have reaches the user as the
    lab's error, naming the container and the engine's words."""
    missing = "dualpath-e2e-no-such-" + secrets.token_hex(4)
    with pytest.raises(engine.EngineError) as info:
        engine.logs(missing, name="prefill-9")
    assert isinstance(info.value, BackendError)
    text = str(info.value)
    assert text.startswith(f"container prefill-9 ({missing[:12]})")
    assert "No such container" in text and missing in text
    with pytest.raises(
        engine.EngineError, match=f"container driver .*No such container: {missing}"
    ):
        engine.exec_in(missing, ["true"], name="driver", out=print, err=print)
