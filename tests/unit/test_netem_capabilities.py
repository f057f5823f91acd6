"""The doctor's report: per link feature, how it is emulated on a kernel with the probed
features, or why it cannot be (pure: built from probe results, no kernel needed)."""

from __future__ import annotations

import dataclasses

from netem.capabilities import DoctorReport, KernelCaps

CI_KERNEL = DoctorReport(
    kernel="6.18",
    cap_net_admin=True,
    cap_sys_admin=True,
    user_namespaces="yes",
    htb="yes",
    tbf="yes",
    fifo="yes",
    ingress="yes",
    ifb="yes",
    mirred="yes",
    u32="yes",
    netem="no",
    nft_numgen="yes",
    iptables_statistic="yes",
)


def features(report: DoctorReport) -> list[str]:
    return [f.line() for f in report.features()]


def test_kernel_without_netem() -> None:
    assert CI_KERNEL.caps == KernelCaps.without_netem()
    assert features(CI_KERNEL) == [
        "rate/ceil/burst: HTB egress, HTB on an IFB for ingress",
        "priority classes: HTB classes, u32 DSCP filters",
        "queue limit: pfifo leaf",
        "delay/jitter: unavailable (no sch_netem)",
        "duplicate: unavailable (no sch_netem)",
        "corrupt: unavailable (no sch_netem)",
        "reorder: unavailable (no sch_netem)",
        "loss: nftables numgen on the lab switch's bridge ports "
        "(apply_shaping, without a lab switch: unavailable, no sch_netem)",
    ]


def test_laptop_kernel_with_netem() -> None:
    laptop = dataclasses.replace(CI_KERNEL, netem="yes")
    assert laptop.caps == KernelCaps.with_netem()
    lines = features(laptop)
    assert "delay/jitter: netem under each HTB leaf" in lines
    assert "queue limit: netem limit under each HTB leaf" in lines
    assert lines[-1] == (
        "loss: nftables numgen on the lab switch's bridge ports "
        "(apply_shaping, without a lab switch: netem)"
    )
    no_nft = dataclasses.replace(laptop, nft_numgen="no")
    assert features(no_nft)[-1] == "loss: netem under each HTB leaf (no nftables numgen)"


def test_unprobed_host_says_so_instead_of_guessing() -> None:
    unknown = dict.fromkeys(
        ("htb", "tbf", "fifo", "ingress", "ifb", "mirred", "u32", "netem", "nft_numgen",
         "iptables_statistic"),
        "unknown",
    )  # fmt: skip
    report = dataclasses.replace(
        CI_KERNEL,
        cap_net_admin=False,
        cap_sys_admin=False,
        errors=("kernel features not probed: needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root)",),
        **unknown,  # type: ignore[arg-type]
    )
    assert report.caps == KernelCaps(netem=False, nft_numgen=False)
    assert not report.can_shape
    lines = report.lines()
    assert "CAP_NET_ADMIN: no, CAP_SYS_ADMIN: no, user namespaces: yes" in lines
    assert "  delay/jitter: unavailable (sch_netem not probed)" in lines
    assert "  loss: unavailable (sch_netem not probed, nft not probed)" in lines
    assert lines[-1].startswith("note: kernel features not probed")
