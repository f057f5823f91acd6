"""Local labs' port bases: below the ephemeral range, and bindable the way servers bind."""

from __future__ import annotations

import socket

from lab.run import backends


def test_base_is_below_the_ephemeral_range_and_bindable() -> None:
    base = backends.free_port_base(64)
    assert base >= backends.PORT_FLOOR
    assert base + 64 <= backends.ephemeral_low()
    assert backends.ports_free(base, 64)


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not backends.ports_free(port, 1)
        assert not backends.ports_free(port - 1, 2)
