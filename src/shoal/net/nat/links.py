"""``PeerLink``: the local endpoint through which this peer's channel to one remote peer runs.

The connection pool dials ``link.address`` (``unix:<dir>/link-<id>.sock``) like any other
address. Each connection gRPC opens there is spliced to the best byte stream available at
that moment (``routing.ranked``): a punched socket waiting to be used, else a new circuit
through the first relay that opens one (relays that fail are put on hold; when all fail,
the relays are resolved again). ``use_punched(sock)`` upgrades: the socket is kept for the
next connection and the current (relayed) connections are aborted, so the channel
reconnects (and re-handshakes) over the punched socket and the relay circuit closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

from shoal.errors import NetworkError, PeerUnavailable
from shoal.net.identity import PeerID
from shoal.net.nat.bridge import LocalEndpoint, Streams
from shoal.net.nat.reserve import RelayAddress
from shoal.net.nat.routing import Link, LinkKind, ranked

__all__ = ["PeerLink"]

OpenRelayed = Callable[[PeerID, RelayAddress], Awaitable[Streams]]
Resolve = Callable[[PeerID], Awaitable[list[RelayAddress]]]


class PeerLink:
    def __init__(
        self,
        peer: PeerID,
        path: str,
        open_relayed: OpenRelayed,
        resolve: Resolve | None = None,
        *,
        hold_s: float = 5.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.peer = peer
        self.relays: list[RelayAddress] = []
        self.kind: LinkKind | None = None
        """Kind of the stream the latest connection runs over."""
        self.current_relay: RelayAddress | None = None
        self.opened: dict[LinkKind, int] = {LinkKind.PUNCHED: 0, LinkKind.RELAYED: 0}
        self._open_relayed = open_relayed
        self._resolve = resolve
        self._hold_s = hold_s
        self._hold_until: dict[str, float] = {}
        self._punched: socket.socket | None = None
        self.endpoint = LocalEndpoint(path, self._open_remote, open_timeout_s=open_timeout_s)

    @property
    def address(self) -> str:
        return self.endpoint.address

    def links(self, now_s: float) -> list[Link]:
        """What this link could use now (input of ``routing``)."""
        out = [
            Link(
                kind=LinkKind.RELAYED,
                address=r.address,
                via=r.peer_id.raw if r.peer_id is not None else b"",
                retry_after_s=self._hold_until.get(r.address, 0.0),
            )
            for r in self.relays
        ]
        if self._punched is not None or self.kind is LinkKind.PUNCHED:
            out.append(Link(kind=LinkKind.PUNCHED, address="punched"))
        return out

    async def start(self) -> PeerLink:
        await self.endpoint.start()
        return self

    async def close(self) -> None:
        await self.endpoint.close()
        if self._punched is not None:
            self._punched.close()
            self._punched = None

    async def use_punched(self, sock: socket.socket) -> None:
        """Route the next connection over ``sock`` and drop the current ones."""
        if self._punched is not None:
            self._punched.close()
        self._punched = sock
        await self.endpoint.reset()

    async def _open_remote(self) -> Streams:
        if self._punched is not None:
            sock, self._punched = self._punched, None
            self.kind, self.current_relay = LinkKind.PUNCHED, None
            self.opened[LinkKind.PUNCHED] += 1
            return await asyncio.open_connection(sock=sock)
        for attempt in range(2):
            if attempt and self._resolve is not None:
                with contextlib.suppress(NetworkError, asyncio.TimeoutError):
                    self.relays = await self._resolve(self.peer)
                    self._hold_until.clear()
            streams = await self._try_relays()
            if streams is not None:
                return streams
        raise PeerUnavailable("no relay opened a circuit", peer=self.peer.to_string())

    async def _try_relays(self) -> Streams | None:
        by_address = {r.address: r for r in self.relays}
        for link in ranked(self.links(time.monotonic()), time.monotonic()):
            relay = by_address.get(link.address)
            if link.kind is not LinkKind.RELAYED or relay is None:
                continue
            try:
                streams = await self._open_relayed(self.peer, relay)
            except NetworkError:
                self._hold_until[relay.address] = time.monotonic() + self._hold_s
                continue
            self.kind, self.current_relay = LinkKind.RELAYED, relay
            self.opened[LinkKind.RELAYED] += 1
            return streams
        return None
