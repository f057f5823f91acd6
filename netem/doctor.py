"""`dualpath doctor`: probe what this host's kernel can emulate and report it (DoctorReport).

Every kernel probe runs inside a throw-away namespace `dpdoctor-<pid>-<hex>` that this module
creates and removes by name; the host's own interfaces, qdiscs and firewall are never touched.
Without CAP_NET_ADMIN/CAP_SYS_ADMIN the kernel probes report 'unknown' instead of failing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from errno import ENOENT, EOPNOTSUPP
from functools import partial
from pathlib import Path
from typing import Any

from netem.capabilities import DoctorReport, Probe
from netem.errors import NetemError
from netem.plan import INGRESS_QDISC, LINK_CLASS, ROOT_QDISC, TC_H_INGRESS, TC_H_ROOT, tc_handle

PROBE_PREFIX = "dpdoctor-"
_UNSUPPORTED = (ENOENT, EOPNOTSUPP, 95)
"""'Unknown qdisc/classifier/action' comes back as ENOENT (EOPNOTSUPP on some paths)."""


def _caps() -> tuple[bool, bool]:
    from netem.netns import CAP_NET_ADMIN, CAP_SYS_ADMIN, _effective_caps

    have = _effective_caps()
    return bool(have >> CAP_NET_ADMIN & 1), bool(have >> CAP_SYS_ADMIN & 1)


def _user_namespaces() -> Probe:
    limit = Path("/proc/sys/user/max_user_namespaces")
    try:
        if int(limit.read_text().strip()) == 0:
            return "no"
    except (OSError, ValueError):
        return "unknown"
    if shutil.which("unshare") is None:
        return "unknown"
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "yes" if done.returncode == 0 else "no"


class _Prober:
    """Runs the kernel probes in one namespace with one netlink socket."""

    def __init__(self, ipr: Any, namespace: str) -> None:
        self.ipr = ipr
        self.namespace = namespace
        self.errors: list[str] = []

    def tc(self, name: str, fn: Callable[[], object]) -> Probe:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            fn()
        except NetlinkError as exc:
            if exc.code in _UNSUPPORTED:
                return "no"
            self.errors.append(f"{name}: {exc}")
            return "unknown"
        except Exception as exc:  # pyroute2 argument errors: the probe is wrong, not the kernel
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            return "unknown"
        return "yes"

    def run(self, name: str, argv: list[str], stdin: str | None = None) -> Probe:
        if shutil.which(argv[0]) is None:
            self.errors.append(f"{name}: {argv[0]} is not installed")
            return "no"
        full = ["ip", "netns", "exec", self.namespace, *argv]
        try:
            done = subprocess.run(
                full, input=stdin, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.errors.append(f"{name}: {exc}")
            return "unknown"
        if done.returncode != 0:
            self.errors.append(f"{name}: {done.stderr.strip()[:200]}")
            return "no"
        return "yes"


def _kernel_probes(namespace: str) -> tuple[dict[str, Probe], list[str]]:
    """Create test links inside `namespace` and try each qdisc/filter/action on them."""
    from pyroute2 import IPRoute

    from netem.netns import _thread_in_netns
    from netem.plan import LossRuleOp, nft_batch, nft_rule, nft_setup

    with _thread_in_netns(namespace):
        ipr = IPRoute()
    p = _Prober(ipr, namespace)
    out: dict[str, Probe] = {}
    try:
        ipr.link("add", ifname="p0", kind="veth", peer="p1")
        idx = {name: ipr.link_lookup(ifname=name)[0] for name in ("p0", "p1")}
        for name in ("p0", "p1"):
            ipr.link("set", index=idx[name], state="up")
        out["ifb"] = p.tc("ifb", partial(ipr.link, "add", ifname="i0", kind="ifb"))
        p0, p1 = idx["p0"], idx["p1"]
        out["htb"] = p.tc(
            "htb",
            partial(ipr.tc, "add", "htb", index=p0, handle=ROOT_QDISC, parent=TC_H_ROOT, default=1),
        )
        if out["htb"] == "yes":
            p.tc(
                "htb class",
                partial(
                    ipr.tc,
                    "add-class",
                    "htb",
                    index=p0,
                    handle=LINK_CLASS,
                    parent=ROOT_QDISC,
                    rate=125_000,
                    burst=3028,
                ),
            )
            out["fifo"] = p.tc(
                "pfifo",
                partial(
                    ipr.tc,
                    "add",
                    "pfifo",
                    index=p0,
                    handle=tc_handle(0x101, 0),
                    parent=LINK_CLASS,
                    limit=10,
                ),
            )
            out["u32"] = p.tc(
                "u32",
                partial(
                    ipr.tc,
                    "add-filter",
                    "u32",
                    index=p0,
                    parent=ROOT_QDISC,
                    prio=1,
                    protocol=0x0800,
                    target=LINK_CLASS,
                    keys=["0x0/0x0+0"],
                ),
            )
        out["netem"] = p.tc(
            "netem",
            partial(
                ipr.tc,
                "add",
                "netem",
                index=p1,
                handle=tc_handle(2, 0),
                parent=TC_H_ROOT,
                delay=1000,
            ),
        )
        if out["netem"] == "yes":
            ipr.tc("del", "netem", index=p1, handle=tc_handle(2, 0), parent=TC_H_ROOT)
        out["tbf"] = p.tc(
            "tbf",
            partial(
                ipr.tc,
                "add",
                "tbf",
                index=p1,
                handle=tc_handle(3, 0),
                parent=TC_H_ROOT,
                rate=125_000,
                burst=3028,
                latency=50_000,
            ),
        )
        out["ingress"] = p.tc(
            "ingress", partial(ipr.tc, "add", "ingress", index=p0, parent=TC_H_INGRESS)
        )
        if out["ingress"] == "yes":
            out["mirred"] = p.tc(
                "mirred",
                partial(
                    ipr.tc,
                    "add-filter",
                    "u32",
                    index=p0,
                    parent=INGRESS_QDISC,
                    prio=1,
                    protocol=0x0003,
                    target=0,
                    keys=["0x0/0x0+0"],
                    action={
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": p1,
                    },
                ),
            )
        ipr.link("add", ifname="b0", kind="bridge")
        import json

        rule = LossRuleOp(port="p1", match="iifname", threshold=1, comment="doctor")
        out["nft_numgen"] = p.run(
            "nft numgen",
            ["nft", "-j", "-f", "-"],
            json.dumps(nft_batch([*nft_setup(), {"add": nft_rule(rule)}])),
        )
        out["iptables_statistic"] = p.run(
            "iptables statistic",
            ["iptables", "-w", "-A", "INPUT", "-m", "statistic", "--mode", "random",
             "--probability", "0.5", "-j", "DROP"],
        )  # fmt: skip
    finally:
        ipr.close()
    for name in ("htb", "fifo", "u32", "ingress", "mirred"):
        out.setdefault(name, "unknown")
    return out, p.errors


def probe() -> DoctorReport:
    """Probe this host. Creates and removes one namespace of its own; never raises for a
    missing feature (that is what the report is for), only NetemError if its own namespace
    cannot be removed."""
    from netem.netns import _create_netns, _NetlinkThread, _remove_namespace

    net_admin, sys_admin = _caps()
    kernel = os.uname().release
    probes: dict[str, Probe] = {}
    errors: list[str] = []
    if net_admin and sys_admin:
        name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        thread = _NetlinkThread("netem-doctor")
        try:

            def run() -> tuple[dict[str, Probe], list[str]]:
                _create_netns(name)
                try:
                    return _kernel_probes(name)
                finally:
                    _remove_namespace(name)

            try:
                probes, errors = thread.call(run)
            except NetemError:
                raise
            except Exception as exc:  # a probe that broke: report it, never guess
                errors.append(f"probe namespace {name}: {exc}")
        finally:
            thread.close()
    else:
        errors.append("kernel features not probed: needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root)")

    def get(key: str) -> Probe:
        return probes.get(key, "unknown")

    return DoctorReport(
        kernel=kernel,
        cap_net_admin=net_admin,
        cap_sys_admin=sys_admin,
        user_namespaces=_user_namespaces(),
        htb=get("htb"),
        tbf=get("tbf"),
        fifo=get("fifo"),
        ingress=get("ingress"),
        ifb=get("ifb"),
        mirred=get("mirred"),
        u32=get("u32"),
        netem=get("netem"),
        nft_numgen=get("nft_numgen"),
        iptables_statistic=get("iptables_statistic"),
        errors=tuple(errors),
    )
