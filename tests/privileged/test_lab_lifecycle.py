"""The `dualpath` CLI on the netns backend: whole runs, Ctrl-C, SIGTERM, crashes, up/down.

Each test drives the real CLI in a subprocess with a private state directory and checks that
afterwards no namespace, process or data directory of the lab is left, and that nothing it did
not create was touched. Nothing here asserts on speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from netem_helpers import ROOT_REASON, TINY_LAB

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]

TINY = TINY_LAB
LONG = {**TINY, "workload": {**TINY["workload"], "num_agents": 16, "max_turns_per_agent": 20}}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}


def _lab_ids(tmp_path: Path) -> set[str]:
    """The labs a test brought up: every run/up writes its spec (with the lab id) under --out."""
    return {json.loads(p.read_text())["lab_id"] for p in tmp_path.rglob("spec.json")}


def _ours(names: set[str], lab_ids: set[str]) -> set[str]:
    return {n for n in names for lab in lab_ids if lab in n}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {
        **os.environ,
        "DUALPATH_STATE_DIR": str(tmp_path / "state"),
        "DUALPATH_DATA_DIR": str(tmp_path),
    }
    before_ns, before_links = _netns(), _links()
    yield e
    # whatever a test did, take down what it recorded, then check that nothing of its labs is
    # left and nothing else was touched. Other labs and a Docker engine may come and go on the
    # same host meanwhile, so only what was there before and belongs to neither is compared.
    subprocess.run([sys.executable, "-m", "lab.cli", "down"], env=e, capture_output=True)
    ids = _lab_ids(tmp_path)
    assert not _ours(_netns() | _links(), ids)
    assert {n for n in before_ns if not n.startswith("dp-")} <= _netns()
    assert {n for n in before_links if not n.startswith(("veth", "br-", "docker"))} <= _links()


def _config(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lab.cli", *args]


def _assert_nothing_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert not (state.exists() and list(state.glob("*.json")))
    assert not [p for p in tmp_path.glob("dualpath-*") if p.is_dir()]
    assert not _ours(_netns(), _lab_ids(tmp_path))


def _wait_for_driver(proc: subprocess.Popen[str], out: Path, timeout_s: float = 60) -> None:
    """Until the run's driver has started replaying (its log exists and the lab is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early with {proc.returncode}")
        if (out / "logs" / "driver.log").exists():
            time.sleep(1.0)
            return
        time.sleep(0.1)
    raise AssertionError("the driver never started")


def test_run_writes_summary_and_leaves_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = _config(tmp_path, TINY)
    out = tmp_path / "out"
    proc = subprocess.run(
        _cli("run", "-c", str(cfg), "--out", str(out), "-q"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "netns"
    assert summary["turns_done"] == 8 and summary["errors"] == []
    assert summary["bytes_accounted"]
    # utilisation comes from the kernel's counters of the shaped NICs
    assert summary["nics"]["prefill-0"]["snic"]["rate_mbit"] == pytest.approx(100.0)
    assert summary["nics"]["prefill-0"]["snic"]["ingress_bytes"] > 0
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_takes_the_lab_down(
    sig: signal.Signals, tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = _config(tmp_path, LONG)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("run", "-c", str(cfg), "--out", str(out), "-q"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a shell's background job starts it: both signals inherited as ignored, which the
        # CLI must not depend on
        preexec_fn=_ignore_stop_signals,
    )
    _wait_for_driver(proc, out)
    pids = json.loads(next((tmp_path / "state").glob("*.run.json")).read_text())["pids"]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    _assert_nothing_left(tmp_path)


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_crashed_runner_is_cleaned_by_down(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = _config(tmp_path, LONG)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("run", "-c", str(cfg), "--out", str(out), "-q"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_driver(proc, out)
    proc.kill()  # no cleanup at all: the state files are all that is left
    proc.wait()
    state = tmp_path / "state"
    assert list(state.glob("*.run.json")) and list(state.glob("*.json"))
    assert _ours(_netns(), _lab_ids(tmp_path))
    down = subprocess.run(_cli("down"), env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "removed" in down.stdout
    _assert_nothing_left(tmp_path)
    assert not _ours(_netns(), _lab_ids(tmp_path))


def _up_tiny(tmp_path: Path, env: dict[str, str]) -> None:
    """`dualpath up` of the tiny lab, its output under tmp_path/up."""
    cfg = _config(tmp_path, TINY)
    up = subprocess.run(
        _cli("up", "-c", str(cfg), "--out", str(tmp_path / "up")),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr


def test_up_status_exec_down(tmp_path: Path, env: dict[str, str]) -> None:
    _up_tiny(tmp_path, env)
    status = subprocess.run(_cli("status"), env=env, capture_output=True, text=True)
    assert "prefill-0" in status.stdout and "running" in status.stdout
    ex = subprocess.run(
        _cli("exec", "prefill-0", "--", "ip", "-br", "addr"),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ex.returncode == 0, ex.stderr
    assert "cnic" in ex.stdout and "snic" in ex.stdout and "198.18.0." in ex.stdout
    # the lab's controller owns it: links change in place through its control endpoint
    assert "controller" in status.stdout
    ctl = int(status.stdout.split("controller")[1].split()[1])

    def snic_classes() -> str:
        tc = _cli("exec", "prefill-0", "--", "tc", "class", "show", "dev", "snic")
        return subprocess.run(tc, env=env, capture_output=True, text=True, timeout=30).stdout

    def link_set(value: str) -> subprocess.CompletedProcess[str]:
        cmd = _cli("link", "set", "prefill-0", "snic", value)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    assert "rate 100Mbit" in snic_classes()
    ls = link_set("rate=50%")
    assert ls.returncode == 0, ls.stderr
    assert "rate 50Mbit" in snic_classes()
    bad = link_set("rate=fast")
    assert bad.returncode == 2 and "rate" in bad.stderr
    assert "rate 50Mbit" in snic_classes()  # a refused change changes nothing
    down = subprocess.run(_cli("down"), env=env, capture_output=True, text=True)
    assert down.returncode == 0
    assert "taken down by its controller" in down.stdout
    assert not Path(f"/proc/{ctl}").exists() or _zombie(ctl)
    _assert_nothing_left(tmp_path)


DAEMON = """
import os, signal, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
with open(sys.argv[1], "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(3600)
"""
"""A daemon as users start one in a node (`iperf3 -s -D` does the same): it leaves the shell
that started it, belongs to no recorded process, and shrugs off SIGTERM."""


def _lab_netns_inodes(lab_id: str) -> set[tuple[int, int]]:
    out = set()
    for entry in Path("/run/netns").iterdir():
        if entry.name.startswith(f"dp-{lab_id}-"):
            st = entry.stat()
            out.add((st.st_dev, st.st_ino))
    return out


def _holders(inodes: set[tuple[int, int]]) -> list[int]:
    """Processes with a thread in one of the namespaces (by inode), whatever their name."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                st = (task / "ns" / "net").stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                found.append(int(proc.name))
                break
    return found


def test_down_ends_what_users_started_in_the_lab(tmp_path: Path, env: dict[str, str]) -> None:
    _up_tiny(tmp_path, env)
    (lab_id,) = _lab_ids(tmp_path)
    pidfile = tmp_path / "daemon.pid"
    ex = subprocess.run(
        _cli("exec", "prefill-0", "--", sys.executable, "-c", DAEMON, str(pidfile)),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ex.returncode == 0, ex.stderr
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    daemon = int(pidfile.read_text())
    inodes = _lab_netns_inodes(lab_id)
    assert daemon in _holders(inodes)  # inside the lab, outside every record
    down = subprocess.run(_cli("down"), env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not Path(f"/proc/{daemon}").exists() or _zombie(daemon)
    # no namespace of the lab lives on without a name: nothing holds one
    assert _holders(inodes) == []
    _assert_nothing_left(tmp_path)


def test_netns_backend_without_cap_net_admin_says_so(tmp_path: Path) -> None:
    """Still uid 0 (so every file stays readable wherever the checkout is), but with an empty
    capability bounding set: no CAP_NET_ADMIN, no CAP_SYS_ADMIN."""
    cfg = _config(tmp_path, TINY)
    proc = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all",
            sys.executable,
            "-m",
            "lab.cli",
            "run",
            "-c",
            str(cfg),
            "--out",
            str(tmp_path / "nocaps"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DUALPATH_STATE_DIR": str(tmp_path / "state")},
    )
    assert proc.returncode == 2, proc.stderr
    assert "CAP_NET_ADMIN" in proc.stderr and "--backend local" in proc.stderr
    # refused before anything was written or created: no spec, so no lab
    assert not list(tmp_path.rglob("spec.json"))
