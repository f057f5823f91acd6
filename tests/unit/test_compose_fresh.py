"""compose.fresh without an engine: which capabilities the fresh-machine container drops (those
the host's bounding set lacks, by bit number), and the container it asks for, as `docker run`
options. (The container itself: `make fresh-test`.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from compose import fresh

ALL_BITS = (1 << len(fresh.CAPABILITIES)) - 1
# A VM's root without CAP_SYS_RESOURCE (bit 24), as on the machine CI runs on.
NO_SYS_RESOURCE = 0x000001FFFEFFFFFF

STATUS = """Name:\tcat
Umask:\t0022
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
CapAmb:\t0000000000000000
"""


def test_the_bounding_set_is_read_from_the_process_status() -> None:
    assert fresh.bounding_set(STATUS) == NO_SYS_RESOURCE
    with pytest.raises(ValueError, match="CapBnd"):
        fresh.bounding_set("Name:\tcat\nCapEff:\t000001fffeffffff\n")


def test_the_capabilities_are_numbered_as_in_linux_capability_h() -> None:
    assert len(fresh.CAPABILITIES) == 41  # CAP_LAST_CAP = CAP_CHECKPOINT_RESTORE (40)
    assert fresh.CAPABILITIES.index("NET_ADMIN") == 12
    assert fresh.CAPABILITIES.index("SYS_ADMIN") == 21
    assert fresh.CAPABILITIES.index("SYS_RESOURCE") == 24
    assert fresh.CAPABILITIES[-1] == "CHECKPOINT_RESTORE"


@pytest.mark.parametrize(
    ("bounding", "dropped"),
    [
        (ALL_BITS, ()),
        (ALL_BITS | (1 << 45), ()),  # bits past the last named capability: nothing to drop
        (NO_SYS_RESOURCE, ("SYS_RESOURCE",)),
        (ALL_BITS & ~(1 << 0) & ~(1 << 40), ("CHOWN", "CHECKPOINT_RESTORE")),
        # an older kernel's set (CAP_LAST_CAP 37): the newer ones are dropped, in bit order
        ((1 << 38) - 1, ("PERFMON", "BPF", "CHECKPOINT_RESTORE")),
        (0, fresh.CAPABILITIES),
    ],
)
def test_only_the_capabilities_the_bounding_set_lacks_are_dropped(
    bounding: int, dropped: tuple[str, ...]
) -> None:
    assert fresh.missing_capabilities(bounding) == dropped


def test_the_container_is_the_privileged_one_less_what_root_lacks() -> None:
    spec = fresh.container_spec(
        "dualpath-bare:bookworm-1",
        head="abc123",
        repo=Path("/tmp/dualpath-fresh.x/repo"),
        bounding=NO_SYS_RESOURCE,
        host_dirs={"/lib/modules", "/usr/local/share/ca-certificates"},
    )
    assert spec.image == "dualpath-bare:bookworm-1"
    assert spec.command == ("sleep", "infinity")
    assert spec.cli_options() == [
        "--network", "host",
        "--cap-add", "ALL",
        "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined",
        "--security-opt", "apparmor=unconfined",
        "--security-opt", "systempaths=unconfined",
        "-v", "/lib/modules:/lib/modules:ro",
        "-v", "/usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro",
        "-v", "/tmp/dualpath-fresh.x/repo:/root/dualpath-mesh",
        "-e", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        "--label", "com.dualpath.fresh-test=abc123",
        "-w", "/root/dualpath-mesh",
    ]  # fmt: skip


def test_host_directories_the_host_lacks_are_not_mounted() -> None:
    spec = fresh.container_spec(
        "img", head="h", repo=Path("/r"), bounding=ALL_BITS, host_dirs={"/somewhere/else"}
    )
    assert [bind.option() for bind in spec.binds] == ["/r:/root/dualpath-mesh"]
    assert spec.cap_drop == ()


def test_exec_without_a_command_fails_before_asking_the_engine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert fresh.main(["exec", "3f2a9c01d2e4"]) == 1
    assert "exec: no command to run" in capsys.readouterr().err
