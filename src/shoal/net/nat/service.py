"""The ``shoal.v1.Relay`` servicer of one peer: DialBack for everyone, relaying when public.

- ``DialBack``: dial the caller back at up to ``MAX_DIAL_BACK`` addresses, each with a
  fresh connection (never a pooled one, which would prove nothing) that must handshake as
  the caller; report which answered and the address the request came from. Only
  addresses on the host the request came from are dialled (no probing of third parties).
- ``Listen`` / ``Connect`` / ``Accept``: delegated to a ``RelayCore`` when this peer relays,
  refused otherwise.
- ``Punch``: delegated to the owner's punch responder (a peer behind a NAT), refused when
  there is none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shoal.errors import NetworkError, PeerUnavailable, ProtocolViolation
from shoal.net.config import split_host_port
from shoal.net.identity import PeerID
from shoal.net.nat.relay import RelayCore, observed_address
from shoal.net.pool import Connection
from shoal.net.proto.v1 import relay_pb2, relay_pb2_grpc
from shoal.net.runtime import NetRuntime
from shoal.net.server import current_caller

__all__ = ["MAX_DIAL_BACK", "RelayService", "parse_address"]

MAX_DIAL_BACK = 4
_MAX_ADDRESS_CHARS = 64

PunchResponder = Callable[[PeerID, relay_pb2.PunchRequest], Awaitable[relay_pb2.PunchReply]]


def parse_address(text: str) -> tuple[str, int]:
    """``(ip, port)`` from ``ip:port``; ProtocolViolation when malformed."""
    parsed = split_host_port(text)
    if parsed is None:
        raise ProtocolViolation(f"not an ip:port address: {text[:_MAX_ADDRESS_CHARS]!r}")
    return parsed


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(
        self,
        runtime: NetRuntime,
        core: RelayCore | None,
        punch: PunchResponder | None = None,
        *,
        dial_back_timeout_s: float = 5.0,
    ) -> None:
        self._runtime = runtime
        self.core = core
        self.punch = punch
        self._dial_back_timeout_s = dial_back_timeout_s

    async def _dial(self, address: str, caller: PeerID) -> bool:
        rt = self._runtime
        conn = Connection(address, caller, rt.config, rt.identity, rt.traffic)
        try:
            await conn.ensure_session(self._dial_back_timeout_s)
            return conn.peer_id == caller
        except NetworkError:
            return False
        finally:
            await conn.close(None)

    async def DialBack(self, request: Any, context: Any) -> relay_pb2.DialBackReply:
        caller = current_caller()
        addresses = list(request.addresses)
        if len(addresses) > MAX_DIAL_BACK:
            raise ProtocolViolation(f"DialBack: more than {MAX_DIAL_BACK} addresses")
        observed = observed_address(context.peer())
        seen_host = parse_address(observed)[0] if observed else None
        # only the host the request came from is dialled: a helper must not be usable to
        # probe third parties (an address elsewhere is simply reported as not reached)
        wanted = [a for a in addresses if parse_address(a)[0] == seen_host]
        results = await asyncio.gather(*(self._dial(a, caller) for a in wanted))
        return relay_pb2.DialBackReply(
            observed=observed,
            reached=[a for a, ok in zip(wanted, results, strict=True) if ok],
        )

    def _relay(self) -> RelayCore:
        if self.core is None:
            raise PeerUnavailable("this peer does not relay")
        return self.core

    async def Listen(self, request: Any, context: Any) -> AsyncIterator[relay_pb2.RelayEvent]:
        async for event in self._relay().listen(current_caller(), observed_address(context.peer())):
            yield event

    async def Connect(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[relay_pb2.RelayFrame]:
        async for frame in self._relay().connect(current_caller(), request_iterator):
            yield frame

    async def Accept(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[relay_pb2.RelayFrame]:
        async for frame in self._relay().accept(current_caller(), request_iterator):
            yield frame

    async def Punch(self, request: Any, context: Any) -> relay_pb2.PunchReply:
        if self.punch is None:
            raise PeerUnavailable("this peer does not punch")
        return await self.punch(current_caller(), request)
