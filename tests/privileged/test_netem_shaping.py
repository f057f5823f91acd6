"""Shaping fidelity: iperf3 goodput through a shaped snic is the configured rate less the
TCP/IP/Ethernet headers HTB charges, within 5 %, for egress (sender's snic) and ingress (the
receiver's IFB). The only timed assertions of the suite; each run is 1 s warm-up + 2 s."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from netem_helpers import (
    ROOT_REASON,
    iperf3,
    lab_up,
    payload_per_frame,
    requires_iperf3,
    storage_host,
)

from netem.netns import NetnsLab
from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    requires_iperf3,
]

RATES_MBIT = (10, 100, 1000)
HIGH_RATE_MBIT = 5000
TOLERANCE = 0.05
SECONDS = 2
CAPACITY_MARGIN = 1.2
"""The 5 Gbit/s case needs the unshaped path to carry 20 % more than the shaped goodput, or
the measurement would be of the CPU, not of the shaper."""


def shaped_host(rate_mbit: float) -> HostSpec:
    index = 10 + RATES_MBIT.index(rate_mbit) if rate_mbit in RATES_MBIT else 20
    return HostSpec(
        f"prefill-{index}",
        (NicSpec("snic", "storage", f"198.18.1.{index}/24", LinkShape(rate_mbit)),),
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    """One lab for the module: an engine host per rate, two unshaped storage servers."""
    spec = TopologySpec(
        "t" + secrets.token_hex(3),
        (
            *(shaped_host(rate) for rate in (*RATES_MBIT, HIGH_RATE_MBIT)),
            storage_host("storage-0", 0),
            storage_host("storage-1", 1),
        ),
    )
    state_dir: Path = tmp_path_factory.mktemp("state")
    with lab_up(spec, state_dir) as lab:
        yield lab


def expected_goodput_bit(lab: NetnsLab, sender: str, rate_mbit: float) -> float:
    """HTB charges every frame's Ethernet + IP + TCP headers; goodput is the payload share."""
    payload, frame = payload_per_frame(lab, sender)
    return rate_mbit * 1e6 * payload / frame


def measure(lab: NetnsLab, rate_mbit: float, direction: str) -> tuple[float, float]:
    shaped = shaped_host(rate_mbit).node_id
    sender, receiver = (shaped, "storage-0") if direction == "egress" else ("storage-0", shaped)
    result = iperf3(lab, sender=sender, receiver=receiver, nic="snic", seconds=SECONDS)
    payload, _ = payload_per_frame(lab, sender)
    assert result.mss == payload, "the header accounting assumes full-size segments"
    return result.goodput_bit, expected_goodput_bit(lab, sender, rate_mbit)


@pytest.mark.parametrize("direction", ["egress", "ingress"])
@pytest.mark.parametrize("rate_mbit", RATES_MBIT)
def test_goodput_matches_the_shaped_rate(lab: NetnsLab, rate_mbit: int, direction: str) -> None:
    got, want = measure(lab, rate_mbit, direction)
    error = got / want - 1
    print(f"{direction} {rate_mbit} Mbit/s: {got / 1e6:.2f} of {want / 1e6:.2f} ({error:+.2%})")
    assert abs(error) <= TOLERANCE, (
        f"{direction} at {rate_mbit} Mbit/s: goodput {got / 1e6:.2f} Mbit/s, "
        f"expected {want / 1e6:.2f} Mbit/s ({error:+.1%})"
    )


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_goodput_at_five_gbit_if_the_machine_can_carry_it(lab: NetnsLab, direction: str) -> None:
    want = expected_goodput_bit(lab, "storage-0", HIGH_RATE_MBIT)
    capacity = iperf3(
        lab, sender="storage-1", receiver="storage-0", nic="snic", seconds=1, port=5202
    ).goodput_bit
    if capacity < CAPACITY_MARGIN * want:
        pytest.skip(
            f"unshaped veth path carries {capacity / 1e9:.2f} Gbit/s here, less than "
            f"{CAPACITY_MARGIN} x the {want / 1e9:.2f} Gbit/s a 5 Gbit/s link would deliver"
        )
    got, want = measure(lab, HIGH_RATE_MBIT, direction)
    error = got / want - 1
    print(
        f"{direction} {HIGH_RATE_MBIT} Mbit/s: {got / 1e6:.1f} of {want / 1e6:.1f} ({error:+.2%})"
    )
    assert abs(error) <= TOLERANCE, (
        f"{direction} at {HIGH_RATE_MBIT} Mbit/s: goodput {got / 1e9:.3f} Gbit/s, "
        f"expected {want / 1e9:.3f} Gbit/s ({error:+.1%})"
    )
