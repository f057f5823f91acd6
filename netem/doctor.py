"""`dualpath doctor`: probe what this host's kernel can emulate and report it (DoctorReport).

Every kernel probe runs inside a throw-away namespace `dpdoctor-<pid>-<hex>` that this module
creates and removes by name; the host's own interfaces, qdiscs and firewall are never touched.
Without CAP_NET_ADMIN/CAP_SYS_ADMIN the kernel probes report 'unknown' instead of failing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from errno import ENOENT, EOPNOTSUPP
from functools import partial
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from netem.capabilities import DoctorReport, Probe
from netem.errors import NetemError
from netem.kernel import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    NetlinkThread,
    create_netns,
    has_cap,
    open_iproute,
    remove_namespace,
)
from netem.nft import nft_batch, nft_rule, nft_setup
from netem.plan import (
    INGRESS_QDISC,
    LINK_CLASS,
    ROOT_QDISC,
    TC_H_INGRESS,
    TC_H_ROOT,
    LossRuleOp,
    tc_handle,
)

PROBE_PREFIX = "dpdoctor-"
_UNSUPPORTED = (ENOENT, EOPNOTSUPP, 95)
"""'Unknown qdisc/classifier/action' comes back as ENOENT (EOPNOTSUPP on some paths)."""


def _caps() -> tuple[bool, bool]:
    return has_cap(CAP_NET_ADMIN), has_cap(CAP_SYS_ADMIN)


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
    """Runs the kernel probes in one namespace with one netlink socket, on a veth pair
    `p0`/`p1` it made there. Each probe records 'yes', 'no' or 'unknown' in `found`, and why a
    probe could not decide in `errors`."""

    def __init__(self, ipr: Any, namespace: str) -> None:
        self.ipr = ipr
        self.namespace = namespace
        self.found: dict[str, Probe] = {}
        self.errors: list[str] = []
        ipr.link("add", ifname="p0", kind="veth", peer="p1")
        self.p0, self.p1 = (ipr.link_lookup(ifname=name)[0] for name in ("p0", "p1"))
        for index in (self.p0, self.p1):
            ipr.link("set", index=index, state="up")

    def tc(self, name: str, fn: Callable[[], object]) -> Probe:
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

    # --- the probes, in the order they run (later ones use what earlier ones made) ---------
    def probe_ifb(self) -> None:
        self.found["ifb"] = self.tc("ifb", partial(self.ipr.link, "add", ifname="i0", kind="ifb"))

    def probe_htb(self) -> None:
        """HTB root on p0, then (if it worked) a class, a pfifo leaf and a u32 filter on it."""
        ipr, p0 = self.ipr, self.p0
        self.found["htb"] = self.tc(
            "htb",
            partial(ipr.tc, "add", "htb", index=p0, handle=ROOT_QDISC, parent=TC_H_ROOT, default=1),
        )
        if self.found["htb"] != "yes":
            return
        self.tc(
            "htb class",
            partial(
                ipr.tc, "add-class", "htb", index=p0, handle=LINK_CLASS, parent=ROOT_QDISC,
                rate=125_000, burst=3028,
            ),
        )  # fmt: skip
        self.found["fifo"] = self.tc(
            "pfifo",
            partial(
                ipr.tc, "add", "pfifo", index=p0, handle=tc_handle(0x101, 0), parent=LINK_CLASS,
                limit=10,
            ),
        )  # fmt: skip
        self.found["u32"] = self.tc(
            "u32",
            partial(
                ipr.tc, "add-filter", "u32", index=p0, parent=ROOT_QDISC, prio=1,
                protocol=0x0800, target=LINK_CLASS, keys=["0x0/0x0+0"],
            ),
        )  # fmt: skip

    def probe_netem(self) -> None:
        """netem as p1's root, removed again (the tbf probe needs the root)."""
        ipr, p1 = self.ipr, self.p1
        handle = tc_handle(2, 0)
        self.found["netem"] = self.tc(
            "netem",
            partial(ipr.tc, "add", "netem", index=p1, handle=handle, parent=TC_H_ROOT, delay=1000),
        )
        if self.found["netem"] == "yes":
            ipr.tc("del", "netem", index=p1, handle=handle, parent=TC_H_ROOT)

    def probe_tbf(self) -> None:
        self.found["tbf"] = self.tc(
            "tbf",
            partial(
                self.ipr.tc, "add", "tbf", index=self.p1, handle=tc_handle(3, 0),
                parent=TC_H_ROOT, rate=125_000, burst=3028, latency=50_000,
            ),
        )  # fmt: skip

    def probe_ingress(self) -> None:
        """An ingress qdisc on p0, then (if it worked) a mirred redirect to p1 from it."""
        ipr, p0 = self.ipr, self.p0
        self.found["ingress"] = self.tc(
            "ingress", partial(ipr.tc, "add", "ingress", index=p0, parent=TC_H_INGRESS)
        )
        if self.found["ingress"] != "yes":
            return
        redirect = {"kind": "mirred", "direction": "egress", "action": "redirect"}
        self.found["mirred"] = self.tc(
            "mirred",
            partial(
                ipr.tc, "add-filter", "u32", index=p0, parent=INGRESS_QDISC, prio=1,
                protocol=0x0003, target=0, keys=["0x0/0x0+0"],
                action={**redirect, "ifindex": self.p1},
            ),
        )  # fmt: skip

    def probe_nft_numgen(self) -> None:
        """The lab's own loss rule (table, chain, numgen rule) on a bridge's port."""
        self.ipr.link("add", ifname="b0", kind="bridge")
        rule = LossRuleOp(port="p1", match="iifname", threshold=1, comment="doctor")
        document = nft_batch([*nft_setup(), {"add": nft_rule(rule)}])
        self.found["nft_numgen"] = self.run(
            "nft numgen", ["nft", "-j", "-f", "-"], json.dumps(document)
        )

    def probe_iptables_statistic(self) -> None:
        self.found["iptables_statistic"] = self.run(
            "iptables statistic",
            ["iptables", "-w", "-A", "INPUT", "-m", "statistic", "--mode", "random",
             "--probability", "0.5", "-j", "DROP"],
        )  # fmt: skip


def _kernel_probes(namespace: str) -> tuple[dict[str, Probe], list[str]]:
    """Create test links inside `namespace` and try each qdisc/filter/action on them."""
    ipr = open_iproute(namespace)
    try:
        p = _Prober(ipr, namespace)
        p.probe_ifb()
        p.probe_htb()
        p.probe_netem()
        p.probe_tbf()
        p.probe_ingress()
        p.probe_nft_numgen()
        p.probe_iptables_statistic()
    finally:
        ipr.close()
    for name in ("htb", "fifo", "u32", "ingress", "mirred"):
        p.found.setdefault(name, "unknown")
    return p.found, p.errors


def probe() -> DoctorReport:
    """Probe this host. Creates and removes one namespace of its own; never raises for a
    missing feature (that is what the report is for), only NetemError if its own namespace
    cannot be removed."""
    net_admin, sys_admin = _caps()
    kernel = os.uname().release
    probes: dict[str, Probe] = {}
    errors: list[str] = []
    if net_admin and sys_admin:
        name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        thread = NetlinkThread("netem-doctor")
        try:

            def run() -> tuple[dict[str, Probe], list[str]]:
                create_netns(name)
                try:
                    return _kernel_probes(name)
                finally:
                    remove_namespace(name)

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
