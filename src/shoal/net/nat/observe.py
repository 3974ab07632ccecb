"""Calls from a chosen local port: how a peer learns the public address of that port.

``probe(runtime, helper_address, helper_id, local_port, addresses)`` opens a private gRPC
connection to a helper whose TCP connection starts from ``local_port`` (bound with
``reusable_socket``, so the same port can punch afterwards), asks the helper to ``DialBack``
``addresses``, and returns the helper's report: the ``ip:port`` it saw (our public mapping
of that port) and which addresses it reached. Each probe has its own short-lived pool and
local endpoint, closed before it returns.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass

from shoal.errors import PeerTimeout, PeerUnavailable
from shoal.net.aio import within
from shoal.net.client import Stub
from shoal.net.config import split_host_port
from shoal.net.health import PeerHealth
from shoal.net.identity import PeerID
from shoal.net.nat.bridge import LocalEndpoint, Streams
from shoal.net.nat.punch import reusable_socket
from shoal.net.nat.reachability import DialBackReport
from shoal.net.pool import ConnectionPool
from shoal.net.proto.v1 import relay_pb2, relay_pb2_grpc
from shoal.net.runtime import NetRuntime

__all__ = ["ProbeResult", "probe"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeResult:
    helper: PeerID
    local: tuple[str, int]
    """Our address of the probe connection (LAN ip, the chosen port)."""
    observed: tuple[str, int] | None
    reached: tuple[str, ...]

    def report(self, asked: tuple[str, ...], at_s: float) -> DialBackReport:
        """As a ``reachability.assess`` input: reached when any asked address was reached."""
        return DialBackReport(
            helper=self.helper.to_string(),
            at_s=at_s,
            observed=self.observed,
            local=self.local,
            dial_back_ok=bool(set(asked) & set(self.reached)) if asked else None,
        )


async def probe(
    runtime: NetRuntime,
    helper_address: str,
    helper_id: PeerID | None,
    local_port: int,
    addresses: tuple[str, ...] = (),
    *,
    timeout_s: float = 5.0,
) -> ProbeResult:
    """Ask ``helper_address`` to dial back ``addresses`` over a connection from ``local_port``.

    Raises:
        PeerUnavailable, PeerTimeout, AuthenticationError: the helper could not be asked.
    """
    loop = asyncio.get_running_loop()
    host, port = helper_address.rsplit(":", 1)
    local: list[tuple[str, int]] = []

    async def open_remote() -> Streams:
        sock = reusable_socket("0.0.0.0", local_port)
        try:
            await within(loop.sock_connect(sock, (host, int(port))), timeout_s)
        except BaseException:
            sock.close()
            raise
        name = sock.getsockname()
        local.append((name[0], name[1]))
        return await asyncio.open_connection(sock=sock)

    folder = runtime.config.unix_socket_dir or tempfile.gettempdir()
    path = os.path.join(folder, f"probe-{os.getpid()}-{local_port}-{id(local):x}.sock")
    pool = ConnectionPool(
        runtime.identity, runtime.config, runtime.traffic, PeerHealth(runtime.config.health)
    )
    endpoint = LocalEndpoint(path, open_remote, open_timeout_s=timeout_s)
    try:
        await endpoint.start()
        stub = Stub(
            relay_pb2_grpc.RelayStub,
            address=endpoint.address,
            peer_id=helper_id,
            pool=pool,
            config=runtime.config,
            traffic=runtime.traffic,
        )
        try:
            reply = await stub.DialBack(
                relay_pb2.DialBackRequest(addresses=list(addresses)), timeout_s=timeout_s
            )
        except asyncio.TimeoutError:
            raise PeerTimeout("probe timed out", peer=helper_address) from None
        if not local or stub.peer_id is None:
            raise PeerUnavailable(f"probe to {helper_address} did not connect")
        return ProbeResult(
            helper=stub.peer_id,
            local=local[-1],
            observed=split_host_port(reply.observed),
            reached=tuple(reply.reached),
        )
    finally:
        await pool.close()
        await endpoint.close()


def now_s() -> float:
    """The clock reports are stamped with (monotonic seconds)."""
    return time.monotonic()
