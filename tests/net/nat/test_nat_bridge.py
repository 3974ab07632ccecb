"""Byte-stream bridges: splice semantics, and a gRPC call over a bridged link.

The "link" is a loopback TCP connection standing in for a punched socket or relay stream:

    grpc channel -> LocalEndpoint (unix) ==splice== link ==splice== bridge_to_unix -> grpc server (unix)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from shoal.errors import PeerUnavailable
from shoal.net.nat.bridge import LocalEndpoint, bridge_to_unix, splice

METHOD = "/shoal.test.Echo/Upper"


def run(coro, timeout_s: float = 20.0) -> None:
    async def bounded() -> None:
        asyncio.current_task().set_name("test-runner")  # type: ignore[union-attr]
        await asyncio.wait_for(coro, timeout_s)

    asyncio.run(bounded())


def assert_no_tasks_left() -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert [t for t in others if t.get_name() != "test-runner"] == []


async def tcp_pair() -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter
]:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    r1, w1 = await asyncio.open_connection(*server.sockets[0].getsockname())
    r2, w2 = await asyncio.wait_for(accepted, 5)
    server.close()
    await server.wait_closed()
    return r1, w1, r2, w2


def test_splice_copies_both_ways_and_forwards_eof() -> None:
    async def main() -> None:
        ar, aw, a_far_r, a_far_w = await tcp_pair()
        br, bw, b_far_r, b_far_w = await tcp_pair()
        task = asyncio.ensure_future(splice((a_far_r, a_far_w), (b_far_r, b_far_w)))
        aw.write(b"x" * 300_000)
        assert await asyncio.wait_for(br.readexactly(300_000), 5) == b"x" * 300_000
        bw.write(b"pong")
        assert await asyncio.wait_for(ar.readexactly(4), 5) == b"pong"
        aw.write_eof()
        assert await asyncio.wait_for(br.read(), 5) == b""  # EOF crossed
        bw.write(b"last")
        bw.write_eof()  # half-closed the other way: data still flows back
        assert await asyncio.wait_for(ar.read(), 5) == b"last"
        stats = await asyncio.wait_for(task, 5)
        assert (stats.a_to_b_bytes, stats.b_to_a_bytes) == (300_000, 8)
        for w in (aw, bw):
            w.close()
        assert_no_tasks_left()

    run(main())


def test_bridge_to_a_missing_unix_socket_is_peer_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        _, w, far_r, far_w = await tcp_pair()
        with pytest.raises(PeerUnavailable):
            await bridge_to_unix((far_r, far_w), str(tmp_path / "nope.sock"), connect_timeout_s=1)
        w.close()

    run(main())


def test_grpc_call_over_a_bridged_link(tmp_path: Path) -> None:
    async def main() -> None:
        server = grpc.aio.server()

        async def upper(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request.upper()

        handler = grpc.unary_unary_rpc_method_handler(upper)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("shoal.test.Echo", {"Upper": handler}),)
        )
        server_path = str(tmp_path / "server.sock")
        server.add_insecure_port(f"unix:{server_path}")
        await server.start()

        # the accepting peer: every link that arrives is bridged into the server's unix socket
        bridges: set[asyncio.Task[object]] = set()

        def on_link(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(bridge_to_unix((r, w), server_path))
            bridges.add(task)
            task.add_done_callback(bridges.discard)

        link_listener = await asyncio.start_server(on_link, "127.0.0.1", 0)
        link_addr = link_listener.sockets[0].getsockname()

        async def open_link() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(*link_addr)

        async with LocalEndpoint(str(tmp_path / "out.sock"), open_link) as endpoint:
            async with grpc.aio.insecure_channel(endpoint.address) as channel:
                call = channel.unary_unary(METHOD)
                for word in (b"hello", b"swarm"):
                    assert await call(word, timeout=5) == word.upper()
            assert endpoint.stats.a_to_b_bytes > 0 and endpoint.stats.b_to_a_bytes > 0
        assert not Path(endpoint.path).exists()
        link_listener.close()
        await link_listener.wait_closed()
        await asyncio.wait_for(asyncio.gather(*bridges, return_exceptions=True), 5)
        await server.stop(grace=None)
        assert_no_tasks_left()

    run(main(), timeout_s=30)
