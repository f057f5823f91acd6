"""Socket options of the frame transport: the DSCP traffic classes and how a socket is marked
and tuned, and the kernel-side gauges a connection reads (FIONREAD, writelines support)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from enum import IntEnum
from typing import Any

_INQ = struct.Struct("i")


class Dscp(IntEnum):
    """Traffic classes on the cnic (architecture: collective > control > kv)."""

    COLLECTIVE = 46
    CONTROL = 24
    KV = 8
    BEST_EFFORT = 0

    @property
    def tos(self) -> int:
        return int(self) << 2


def set_dscp(sock: socket.socket | None, dscp: Dscp) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp.tos)


def tune_socket(sock: Any) -> None:
    """TCP_NODELAY on a frame socket (errors ignored: a closing socket needs none)."""
    if sock is None:
        return
    # Only NODELAY: fixed SO_SNDBUF/SO_RCVBUF would switch off the kernel's autotuning.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def kernel_unread(sock: Any) -> int:
    """Bytes in the socket's kernel receive queue (FIONREAD, alias SIOCINQ); 0 if unknown."""
    if sock is None:
        return 0
    try:
        fd = sock.fileno()
        if fd < 0:
            return 0
        raw = fcntl.ioctl(fd, termios.FIONREAD, bytes(_INQ.size))
    except (OSError, ValueError):
        return 0
    return int(_INQ.unpack(raw)[0])


def has_native_writelines(transport: asyncio.Transport) -> bool:
    """True when `transport.writelines` writes a list without joining it first (uvloop, and
    3.12+'s selector transports)."""
    return type(transport).writelines is not asyncio.WriteTransport.writelines
