"""The README's path for users without root: `dualpath run --backend local` as an unprivileged
user, from its own state directory to the end, and a state directory it cannot write refused
with a clear error, not a traceback. Root is needed only to become that user."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from netem_helpers import ROOT_REASON, TINY_LAB

from compose.backend import SOURCE_PACKAGES

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON + " (here: to become another user)"),
]


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")


def _as_user(
    user: pwd.struct_passwd, argv: list[str], env: dict[str, str], **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        cwd=env["HOME"],  # the test's own directory may be out of the user's reach
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def stage() -> Iterator[tuple[Path, pwd.struct_passwd, dict[str, str]]]:
    """A directory the user owns, holding a copy of the lab's packages, and an environment that
    runs them with an interpreter the user can execute (a checkout under /root, or a venv whose
    interpreter lives there, is out of its reach)."""
    user = _user()
    root = Path(tempfile.mkdtemp(prefix="dualpath-unpriv-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        for pkg in SOURCE_PACKAGES:
            shutil.copytree(
                REPO / pkg, root / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__")
            )
        home, runtime = root / "home", root / "runtime"
        for d in (home, runtime):
            d.mkdir()
        for d in (root, home, runtime):
            os.chown(d, user.pw_uid, user.pw_gid)
        os.chmod(runtime, 0o700)
        paths = sysconfig.get_paths()
        sites = list(dict.fromkeys((paths["purelib"], paths["platlib"])))
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": os.pathsep.join([str(root / "src"), *sites]),
            "LANG": "C.UTF-8",
        }
        python = _python_for(user, env)
        if python is None:  # the dependencies are out of the user's reach too: copy them
            for i, site in enumerate(sites):
                shutil.copytree(site, root / f"site{i}", symlinks=True)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(root / "src"), *(str(root / f"site{i}") for i in range(len(sites)))]
            )
            python = _python_for(user, env)
        if python is None:
            pytest.skip(f"no python {sys.version_info[:2]} that {user.pw_name} can run")
        env["DUALPATH_TEST_PYTHON"] = python
        yield root, user, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _python_for(user: pwd.struct_passwd, env: dict[str, str]) -> str | None:
    """This interpreter if the user can run it with the lab's dependencies, else the system's
    python3 of the same version (extension modules are built for the version, not the build).
    A copy of the lab's own packages that does not import fails the test: only an interpreter
    or dependencies out of the user's reach may skip it."""
    probe = "import numpy, grpc, aiohttp, msgpack, msgspec, uvloop, crc32c, yaml, lab.cli"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not os.path.exists(python):
            continue
        try:
            done = _as_user(user, [python, "-c", probe], env, timeout=60)
        except PermissionError:  # not even executable by the user (e.g. under /root)
            continue
        if done.returncode == 0:
            return python
        missing = re.search(r"No module named '([\w.]+)'", done.stderr)
        if missing and missing.group(1).split(".")[0] in SOURCE_PACKAGES:
            pytest.fail(f"the staged copy of the lab does not import: {done.stderr[-2000:]}")
    return None


def _run_local(
    stage: tuple[Path, pwd.struct_passwd, dict[str, str]], config: dict[str, object], **env: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`dualpath run --backend local` of `config` as the stage's user; (result, --out dir)."""
    root, user, base = stage
    home = root / "home"
    cfg = home / "lab.yaml"
    cfg.write_text(yaml.safe_dump(config))
    os.chown(cfg, user.pw_uid, user.pw_gid)
    out = home / "out"
    argv = [base["DUALPATH_TEST_PYTHON"], "-m", "lab.cli", "run", "-c", str(cfg)]
    argv += ["--backend", "local", "--out", str(out), "-q"]
    run_env = {**base, "DUALPATH_DATA_DIR": str(home), **env}
    res = _as_user(user, argv, run_env, timeout=600)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not list(home.glob("dualpath-*"))  # the run's data directory is gone with it
    return res, out


def test_unprivileged_user_runs_the_local_backend_to_the_end(
    stage: tuple[Path, pwd.struct_passwd, dict[str, str]],
) -> None:
    root, user, _ = stage
    res, out = _run_local(stage, {**TINY_LAB, "policy": "dualpath"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["turns_done"] == 8 and summary["turns_failed"] == 0
    assert summary["bytes_accounted"]
    state = root / "runtime" / "dualpath"  # the user's own state directory, owner-only
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    assert state.stat().st_uid == user.pw_uid
    assert not list(state.iterdir())  # the run's record is gone with the run


def test_unwritable_state_directory_is_a_clear_error(
    stage: tuple[Path, pwd.struct_passwd, dict[str, str]],
) -> None:
    root = stage[0]
    locked = root / "locked"  # root's, mode 0755: the user cannot create anything in it
    locked.mkdir()
    res, _ = _run_local(stage, TINY_LAB, DUALPATH_STATE_DIR=str(locked / "state"))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "cannot use the state directory" in res.stderr and "DUALPATH_STATE_DIR" in res.stderr
    assert not (locked / "state").exists()
