"""The live dashboard in a real browser during a real chaos run (netns): headless Chromium
(Debian's chromium and chromedriver, driven through selenium) loads the page the run prints,
waits for data, and

- the bytes a NIC row shows lie between two readings of the same kernel counter (`tc -s -j
  qdisc show` in the node's namespace) taken before and after the page's sample;
- a link change made with the page's form is refused when invalid (the error is shown, nothing
  changes) and, when valid, is in the kernel (`tc class show`: the HTB link class's new rate),
  in the row the page shows, on its timeline, and in the run's summary.json as a change by hand;
- the page is saved as a screenshot (DUALPATH_SCREENSHOT_DIR: also copied there, which is how
  docs/dashboard.png is made).

No assertion on speed: the bracket is an ordering of three readings, not a timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from netem_helpers import ROOT_REASON, TINY_LAB
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from netem.plan import ifb_name, namespace_name

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]


ROOT = Path(__file__).resolve().parents[2]
CONFIG: dict[str, Any] = {
    **TINY_LAB,
    "name": "dashboard",
    "scaling": {"bandwidth_scale": 0.00005, "time_dilation": 2},
    "workload": {
        **TINY_LAB["workload"],
        "num_agents": 40,
        "arrival": "poisson",
        "agents_per_s": 1.5,
        "max_len": 65536,
        "max_turns_per_agent": 4,
    },
}
"""1P1D with one storage server, 40 agents arriving over ~55 lab seconds: long enough to
load the page, watch and change a link while KV flows."""
SCENARIO: dict[str, Any] = {
    "name": "snic-dip",
    "events": [
        {"at": "6s", "set": {"node": "prefill-0", "nic": "snic", "rate": "25%"}},
        {"at": "22s", "set": {"node": "prefill-0", "nic": "snic", "rate": "100%"}},
    ],
}
NEW_RATE_MBIT = 7
"""Set on decode-0's snic from the page (configured: 20 Mbit/s at this scale)."""
WAIT_S = 120.0
"""Longest wait for anything the page should show (a lost page fails, not hangs)."""

T = TypeVar("T")


def _until(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_value = probe()
        if with_value is not None and with_value is not False:
            return with_value
        time.sleep(0.25)
    raise AssertionError(f"the dashboard never showed {what} within {timeout:.0f} s")


def _tc_json(namespace: str, *argv: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "-s", "-j", *argv],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return list(json.loads(done.stdout or "[]"))


def _root_htb_bytes(namespace: str, dev: str) -> int:
    """The bytes the root HTB qdisc of `dev` has sent: what the lab counts for a shaped NIC
    direction (egress on the NIC, ingress on its IFB), read here with tc, not with the lab."""
    for q in _tc_json(namespace, "qdisc", "show", "dev", dev):
        if q.get("kind") == "htb" and q.get("root"):
            return int(q["bytes"])
    raise AssertionError(f"{namespace}: no root HTB on {dev}")


def _link_class_rate_bits(namespace: str, dev: str) -> int:
    """The rate of HTB class 1:1 (the link's) on `dev` as the kernel holds it, bit/s (tc
    prints classes as text only)."""
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "class", "show", "dev", dev],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    m = re.search(r"^class htb 1:1 .*? rate (\d+(?:\.\d+)?)([KMG]?)bit", done.stdout, re.M)
    assert m, f"{namespace}: no HTB class 1:1 on {dev}: {done.stdout!r}"
    return round(float(m[1]) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m[2]])


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "make system-deps installs chromium and chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1400",
                f"--user-data-dir={tmp_path / 'profile'}",
                # nothing listens there: any fetch but the dashboard's (loopback is never
                # proxied) would fail
                "--proxy-server=http://127.0.0.1:9"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def run_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "DUALPATH_STATE_DIR": str(tmp_path / "state"),
        "DUALPATH_DATA_DIR": str(tmp_path),
    }
    yield env
    subprocess.run([sys.executable, "-m", "lab.cli", "down"], env=env, capture_output=True)


def _lab_record(state: Path) -> dict[str, Any] | None:
    for path in state.glob("*.run.json"):
        record = json.loads(path.read_text())
        if record.get("dashboard_url") and record.get("control_url"):
            return dict(record)
    return None


def _texts(driver: Any, css: str) -> list[str]:
    """The text of every element `css` selects, read in one go in the page (it redraws its
    table and timeline every second, so an element found first may be gone when read)."""
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", css
    )
    return [str(t) for t in found]


def _row_cell(driver: Any, node: str, nic: str, field: str) -> str | None:
    cells = _texts(driver, f'tr[data-node="{node}"][data-nic="{nic}"] td[data-field="{field}"]')
    return cells[0] if cells else None


def _text(driver: Any, element_id: str) -> str:
    return next(iter(_texts(driver, f"#{element_id}")), "")


def _sampled_wall(driver: Any) -> float:
    wall = driver.execute_script("return document.getElementById('sampled').dataset.wall")
    return float(wall) if wall else 0.0


def test_the_dashboard_follows_a_chaos_run_and_changes_a_link(
    tmp_path: Path, run_env: dict[str, str], browser: Any
) -> None:
    cfg, scenario, out = tmp_path / "lab.yaml", tmp_path / "scenario.yaml", tmp_path / "out"
    cfg.write_text(yaml.safe_dump(CONFIG))
    scenario.write_text(yaml.safe_dump(SCENARIO))
    argv = [sys.executable, "-m", "lab.cli", "chaos", "-c", str(cfg), "--scenario", str(scenario),
            "--dashboard", "0", "--out", str(out), "-q",
            # figures are not asserted here; the run only has to carry traffic
            "--allow-host-bound"]  # fmt: skip
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen(argv, env=run_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        record = _until("a lab record", lambda: _lab_record(tmp_path / "state"), timeout=180)
        lab_id = str(record["lab_id"])
        browser.get(f"{record['dashboard_url']}#token={record['secret']}")
        _until("a live stream", lambda: "live" in _text(browser, "status"))
        _until(
            "prefill-0's snic row", lambda: _row_cell(browser, "prefill-0", "snic", "ingress-mb")
        )
        _until("a finished turn", lambda: browser.execute_script("return state.ttft.x.length") > 0)

        # the page's bytes, bracketed by the kernel's own counter read before and after
        ns, ifb = namespace_name(lab_id, "prefill-0"), ifb_name("snic")
        before, read_at = _root_htb_bytes(ns, ifb), time.time()
        _until("a sample after the kernel reading", lambda: _sampled_wall(browser) > read_at)
        shown = float(_row_cell(browser, "prefill-0", "snic", "ingress-mb") or "nan") * 1e6
        after = _root_htb_bytes(ns, ifb)
        print(f"prefill-0 snic ingress bytes: kernel {before}, page {shown:.0f}, kernel {after}")
        assert before - 500 <= shown <= after + 500, (before, shown, after)  # 3-decimal MB
        assert after > 0

        # an invalid change is refused with its reason on the page, and nothing changes
        ns_decode = namespace_name(lab_id, "decode-0")
        rate_before = _link_class_rate_bits(ns_decode, "snic")
        Select(browser.find_element(By.ID, "link-node")).select_by_value("decode-0")
        Select(browser.find_element(By.ID, "link-nic")).select_by_value("snic")
        browser.find_element(By.ID, "link-rate").send_keys("fast")
        browser.find_element(By.ID, "link-apply").click()
        refused = _until(
            "the refusal", lambda: "refused" in (t := _text(browser, "control-result")) and t,
        )  # fmt: skip
        assert "400" in refused and "rate" in refused
        assert _link_class_rate_bits(ns_decode, "snic") == rate_before

        # a valid one reaches the kernel, the page's row and its timeline
        rate = browser.find_element(By.ID, "link-rate")
        rate.clear()
        rate.send_keys(f"{NEW_RATE_MBIT}mbit")
        browser.find_element(By.ID, "link-apply").click()
        _until("the change done", lambda: "done" in _text(browser, "control-result"))  # fmt: skip
        assert _link_class_rate_bits(ns_decode, "snic") == NEW_RATE_MBIT * 1_000_000
        assert _link_class_rate_bits(ns_decode, ifb_name("snic")) == NEW_RATE_MBIT * 1_000_000
        _until(
            "the new rate in decode-0's row",
            lambda: (
                _row_cell(browser, "decode-0", "snic", "rate")
                == f"{NEW_RATE_MBIT}.000 / {NEW_RATE_MBIT}.000"
            ),
        )
        _until(
            "the change on the timeline",
            lambda: any(
                "decode-0 snic: rate 7 Mbit/s (by hand)" in t for t in _texts(browser, "#events li")
            ),
        )

        # the scenario's dip and return, then the picture
        _until(
            "both scenario steps",
            lambda: sum("(scenario" in t for t in _texts(browser, "#events li")) == 2,
        )
        time.sleep(3)  # a few samples after the last step, so the plots show the return
        browser.execute_script("window.scrollTo(0, 0)")  # the form scrolled it down
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("DUALPATH_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["DUALPATH_SCREENSHOT_DIR"]) / "dashboard.png")

        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
        _until("the end of the run", lambda: "ended" in _text(browser, "status")
               or None, timeout=30)  # fmt: skip
    except WebDriverException as exc:
        raise AssertionError(f"browser: {exc.msg}") from exc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)

    summary = json.loads((out / "summary.json").read_text())
    by_hand = summary["control"]["events"]
    assert [(e["node"], e["nic"], e["changes"]) for e in by_hand] == [
        ("decode-0", "snic", {"rate_mbit": float(NEW_RATE_MBIT)})
    ]
    assert len(summary["chaos"]["events"]) == 2
