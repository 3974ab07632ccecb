"""Hole-punch connect loop on loopback: port reuse, bounded attempts, deadlines.

Simultaneous open through real NATs is tested in tests/netns/test_nat_punch_netns.py.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from shoal.errors import ConfigError, PeerTimeout, PeerUnavailable
from shoal.net.nat.punch import PunchConfig, punch, reusable_socket


def run(coro, timeout_s: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connects_from_the_port_of_a_still_open_rendezvous_connection() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put(w.get_extra_info("peername"))
            await r.read()
            w.close()

        rendezvous = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        peer = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        control = reusable_socket("127.0.0.1", 0)
        await loop.sock_connect(control, rendezvous.sockets[0].getsockname())
        port = control.getsockname()[1]
        result = await punch(port, peer.sockets[0].getsockname(), local_host="127.0.0.1")
        assert result.attempts == 1 and result.local == ("127.0.0.1", port)
        seen = {(await accepted.get())[1], (await accepted.get())[1]}
        assert seen == {port}  # both servers saw the same source port
        for sock in (control, result.sock):
            sock.close()
        for server in (rendezvous, peer):
            server.close()
            await server.wait_closed()

    run(main())


def test_refused_peer_fails_after_bounded_attempts() -> None:
    async def main() -> None:
        # a refusal ends an attempt at once: waiting out any attempt timeout would take >= 5 s
        # (the bound leaves room for a loaded machine and still catches that)
        cfg = PunchConfig(attempts=3, attempt_timeout_s=5.0, retry_gap_s=0.01)
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="after 3 attempts") as info:
            await punch(0, ("127.0.0.1", closed_port()), cfg, local_host="127.0.0.1")
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert time.monotonic() - started < 4.0

    run(main())


def test_total_deadline_bounds_many_attempts() -> None:
    async def main() -> None:
        # without the total deadline, 100 attempts 0.05 s apart would take >= 5 s
        cfg = PunchConfig(
            attempts=100, attempt_timeout_s=10.0, retry_gap_s=0.05, total_timeout_s=0.3
        )
        started = time.monotonic()
        with pytest.raises(PeerTimeout):
            await punch(0, ("127.0.0.1", closed_port()), cfg, local_host="127.0.0.1")
        assert 0.3 <= time.monotonic() - started < 3.0

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempt_timeout_s": 0}, "attempt_timeout_s"),
        ({"retry_gap_s": -1}, "retry_gap_s"),
    ],
)
def test_config_is_checked(kwargs, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PunchConfig(**kwargs)
