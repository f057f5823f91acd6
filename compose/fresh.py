"""The fresh-machine tier's container (.ci/fresh-test) through the engine's API: the bare
Debian image run detached with root's capabilities, commands run in it with their output
streamed as it comes, and its removal by id (`python -m compose.fresh start|exec|remove`).

The script keeps the clone, the phases and the cleanup; this module plans the container's
options (pure: `container_spec`, from the bounding set) and asks the engine. It removes only
the container id it is given.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from compose import engine
from compose.engine import Bind, ComposeError, ContainerSpec

NAME = "fresh-test"
"""How errors name the container (it has no name of its own, like `docker run` without one)."""
LABEL = "com.dualpath.fresh-test"
"""Its label, valued with the commit under test."""
WORKDIR = "/root/dualpath-mesh"
"""Where the clone is mounted, and the commands' working directory."""

# The capability names by bit number, as in linux/capability.h.
CAPABILITIES: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip

# Host directories mounted read-only when the host has them: kernel modules the lab may load
# (ifb, sch_htb, nf_tables) where the kernel has them as modules; the machine's own TLS trust
# anchors (a site CA in front of PyPI, as on this kind of host), which are the machine's, not
# the project's: Debian's place for them, merged into the container's bundle by
# update-ca-certificates, with pip (whose newer versions bring their own) pointed at it.
HOST_DIRS: tuple[str, ...] = ("/lib/modules", "/usr/local/share/ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def bounding_set(status: str) -> int:
    """The capability bounding set (`CapBnd:`, hex) of a /proc/<pid>/status text."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "CapBnd":
            return int(value.strip(), 16)
    raise ValueError("no CapBnd line in the process status")


def missing_capabilities(bounding: int) -> tuple[str, ...]:
    """The capabilities (of those named in CAPABILITIES) whose bit `bounding` lacks."""
    return tuple(name for bit, name in enumerate(CAPABILITIES) if not (bounding >> bit) & 1)


def container_spec(
    image: str, *, head: str, repo: Path, bounding: int, host_dirs: Collection[str]
) -> ContainerSpec:
    """The fresh-machine container: what `--privileged` gives, less the capabilities this
    machine's root lacks (`bounding`: runc refuses to start a privileged container then; a
    VM's root may lack CAP_SYS_RESOURCE), on the host's network (Debian's and PyPI's
    registries answer only from the host's namespace), the clone `repo` of commit `head` as
    its working directory, and those of HOST_DIRS that are in `host_dirs`."""
    return ContainerSpec(
        image=image,
        command=("sleep", "infinity"),
        network_mode="host",
        cap_add=("ALL",),
        cap_drop=missing_capabilities(bounding),
        security_opt=("seccomp=unconfined", "apparmor=unconfined"),
        unconfined_system_paths=True,
        binds=(
            *(Bind(d, d, read_only=True) for d in HOST_DIRS if d in host_dirs),
            Bind(str(repo), WORKDIR),
        ),
        environment={"PIP_CERT": CA_BUNDLE},
        labels={LABEL: head},
        working_dir=WORKDIR,
    )


def start(image: str, *, head: str, repo: Path) -> str:
    """Run the container for this machine (its bounding set, its host directories); its id."""
    spec = container_spec(
        image,
        head=head,
        repo=repo,
        bounding=bounding_set(Path("/proc/self/status").read_text()),
        host_dirs={d for d in HOST_DIRS if os.path.isdir(d)},
    )
    cid = engine.run_detached(spec, name=NAME)
    print(f"[fresh-test] container {cid[:12]} ({' '.join(spec.cli_options())})", file=sys.stderr)
    return cid


def _write(stream: int) -> Callable[[bytes], object]:
    """A sink for the command's output on our stdout (1) or stderr (2), flushed as it comes."""
    sink = (sys.stdout if stream == 1 else sys.stderr).buffer

    def write(data: bytes) -> None:
        sink.write(data)
        sink.flush()

    return write


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compose.fresh", description="The engine's steps of .ci/fresh-test."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("start", help="run IMAGE detached; print the container's id")
    run.add_argument("image")
    run.add_argument("--head", required=True, help="the commit under test (the label's value)")
    run.add_argument("--repo", type=Path, required=True, help=f"the clone, mounted at {WORKDIR}")
    ex = verbs.add_parser("exec", help="run CMD in the container; exit with its status")
    ex.add_argument("cid")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD ...")
    rm = verbs.add_parser("remove", help="remove the container, even running")
    rm.add_argument("cid")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The script's entry point: `start` prints the id, `exec` exits with the command's
    status; 1 with the error (naming the container or image and the cause) on stderr."""
    args = _parser().parse_args(argv)
    try:
        if args.verb == "start":
            print(start(args.image, head=args.head, repo=args.repo.resolve()))
        elif args.verb == "exec":
            if not args.argv:
                raise ComposeError("exec: no command to run")
            return engine.exec_in(args.cid, args.argv, name=NAME, out=_write(1), err=_write(2))
        else:
            engine.remove("container", args.cid)
    except ComposeError as exc:
        print(f"[fresh-test] {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Die of the SIGINT, not exit 130: a shell runs its INT trap (the script's cleanup)
        # only for a child the signal killed, and carries on after one that exited.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130  # not reached
    return 0


__all__ = [
    "CAPABILITIES",
    "HOST_DIRS",
    "bounding_set",
    "container_spec",
    "main",
    "missing_capabilities",
    "start",
]

if __name__ == "__main__":
    sys.exit(main())
