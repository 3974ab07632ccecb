"""``Traversal``: NAT traversal for one ``NetRuntime`` — relay service, reservations, links.

    nat = Traversal(runtime, TraversalConfig(relay=RelayConfig()))   # a public peer relays
    await nat.start()                                                # on the network loop
    nat.reserve([RelayAddress("198.18.0.2:4000", relay_id)])        # a peer behind a NAT
    address = await nat.address_for(peer, direct=[], relays=[...])   # give it to runtime.stub
    await nat.upgrade(peer)                                          # try hole punching
    verdict = await nat.check_reachability(helpers, advertised)      # dial-back votes

``address_for`` applies ``routing.choose``: a direct address when the peer has one, else
the peer's ``PeerLink`` endpoint (punched socket when there is one, else a relay circuit).
``upgrade`` coordinates a punch through the relayed link itself: we learn our public
address of a fresh port from the relay, send it to the peer in ``Relay.Punch``, get the
peer's, and both run ``punch()`` after ``punch_delay_s``. The dialer is the gRPC client on
the punched socket; the peer bridges it into its server. On failure the link stays relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shoal.errors import ConfigError, NetworkError, PeerUnavailable
from shoal.net.aio import within
from shoal.net.config import split_host_port
from shoal.net.identity import PeerID
from shoal.net.nat.bridge import Streams, bridge_to_unix
from shoal.net.nat.circuit import open_circuit
from shoal.net.nat.limits import RelayConfig
from shoal.net.nat.links import PeerLink
from shoal.net.nat.observe import probe
from shoal.net.nat.punch import PunchConfig, PunchResult, punch, reusable_socket
from shoal.net.nat.reachability import ReachabilityConfig, Verdict, assess
from shoal.net.nat.relay import RelayCore
from shoal.net.nat.reserve import RelayAddress, Reserver, ReserverConfig
from shoal.net.nat.routing import Link, LinkKind, choose
from shoal.net.nat.service import RelayService, parse_address
from shoal.net.proto.v1 import relay_pb2, relay_pb2_grpc
from shoal.net.runtime import NetRuntime
from shoal.net.tasks import TaskSet

__all__ = ["Traversal", "TraversalConfig"]

_log = logging.getLogger(__name__)
Resolve = Callable[[PeerID], Awaitable[list[RelayAddress]]]
Puncher = Callable[[int, tuple[str, int], PunchConfig], Awaitable[PunchResult]]


@dataclass(kw_only=True, slots=True)
class TraversalConfig:
    relay: RelayConfig | None = None
    """Serve as a relay with these limits (public peers); None: do not relay."""
    reserver: ReserverConfig = field(default_factory=ReserverConfig)
    punch: PunchConfig = field(
        default_factory=lambda: PunchConfig(attempts=2, attempt_timeout_s=3.0, total_timeout_s=7.0)
    )
    max_punches_in_flight: int = 4
    """Incoming punch requests served at once; more are declined (traffic stays relayed)."""
    punch_delay_s: float = 0.2
    """Both sides start connecting this long after the punch reply."""
    probe_timeout_s: float = 5.0
    """Deadline of one dial-back probe."""
    circuit_open_timeout_s: float = 10.0
    circuit_lifetime_s: float = 24 * 3600.0
    reachability: ReachabilityConfig = field(default_factory=ReachabilityConfig)
    endpoint_dir: str | None = None
    """Folder of the local endpoints (default: the runtime's unix socket folder)."""

    def __post_init__(self) -> None:
        for name in ("punch_delay_s", "probe_timeout_s", "circuit_open_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(
                    f"TraversalConfig.{name} must be >= 0, got {getattr(self, name)!r}"
                )
        if not isinstance(self.max_punches_in_flight, int) or self.max_punches_in_flight < 0:
            raise ConfigError(
                "TraversalConfig.max_punches_in_flight must be an int >= 0, "
                f"got {self.max_punches_in_flight!r}"
            )
        if not self.circuit_lifetime_s > 0:
            raise ConfigError(
                f"TraversalConfig.circuit_lifetime_s must be > 0, got {self.circuit_lifetime_s!r}"
            )


def _free_port() -> int:
    sock = reusable_socket()
    try:
        port: int = sock.getsockname()[1]
        return port
    finally:
        sock.close()


class Traversal:
    def __init__(
        self,
        runtime: NetRuntime,
        config: TraversalConfig | None = None,
        resolve: Resolve | None = None,
        *,
        puncher: Puncher = punch,
    ) -> None:
        """``puncher`` is ``punch.punch``; tests on loopback (where a closed port answers
        with RST, so simultaneous open cannot be timed) pass a stand-in."""
        self.runtime = runtime
        self._punch = puncher
        self.config = config or TraversalConfig()
        self.resolve = resolve
        self.core = RelayCore(self.config.relay) if self.config.relay is not None else None
        self.service = RelayService(runtime, self.core, self._respond_punch)
        self.reserver: Reserver | None = None
        self.verdict: Verdict | None = None
        self.links: dict[bytes, PeerLink] = {}
        self.punched_in = 0
        self._punching_in = 0
        self._tasks = TaskSet("traversal", runtime.spawn)
        self._started = False

    async def start(self) -> Traversal:
        if not self._started:
            self._started = True
            self.runtime.add_servicer(relay_pb2_grpc.add_RelayServicer_to_server, self.service)
        return self

    def reserve(
        self,
        candidates: list[RelayAddress],
        on_change: Callable[[list[RelayAddress]], None] | None = None,
    ) -> Reserver:
        """Keep reservations among ``candidates`` (call on the loop)."""
        if self.reserver is None:
            self.reserver = Reserver(self.runtime, candidates, self.config.reserver, on_change)
            self.reserver.start()
        return self.reserver

    async def close(self) -> None:
        """Stop reserving, close links and owned tasks; idempotent."""
        if self.reserver is not None:
            await self.reserver.close()
        for link in list(self.links.values()):
            await link.close()
        await self._tasks.close()
        self.runtime.remove_service("shoal.v1.Relay")

    # -- links ----------------------------------------------------------------------------
    async def _open_relayed(self, peer: PeerID, relay: RelayAddress) -> Streams:
        stub = self.runtime.stub(relay_pb2_grpc.RelayStub, relay.address, relay.peer_id)
        return await open_circuit(
            stub.Connect,
            relay_pb2.RelayFrame(target=peer.raw),
            tasks=self._tasks,
            open_timeout_s=self.config.circuit_open_timeout_s,
            lifetime_s=self.config.circuit_lifetime_s,
        )

    async def link(self, peer: PeerID, relays: list[RelayAddress]) -> PeerLink:
        """The (started) ``PeerLink`` to ``peer``; ``relays`` replace what it knew if given."""
        link = self.links.get(peer.raw)
        if link is None:
            folder = (
                self.config.endpoint_dir
                or self.runtime.config.unix_socket_dir
                or (os.path.dirname(self.runtime.unix_path) if self.runtime.unix_path else None)
                or tempfile.gettempdir()
            )
            path = os.path.join(folder, f"link-{self.runtime.port}-{peer.raw[:8].hex()}.sock")
            link = PeerLink(
                peer,
                path,
                self._open_relayed,
                self.resolve,
                open_timeout_s=self.config.circuit_open_timeout_s,
            )
            await link.start()
            self.links[peer.raw] = link
        if relays:
            link.relays = list(relays)
        return link

    async def address_for(
        self, peer: PeerID, *, direct: list[str], relays: list[RelayAddress]
    ) -> str:
        """Where ``runtime.stub`` should dial ``peer`` (``routing.choose`` over its links)."""
        now = time.monotonic()
        links = [Link(kind=LinkKind.DIRECT, address=a) for a in direct]
        known = self.links.get(peer.raw)
        if known is not None:
            links += known.links(now)
        links += [Link(kind=LinkKind.RELAYED, address=r.address) for r in relays]
        best = choose(links, now)
        if best is None:
            raise PeerUnavailable("no known way to reach the peer", peer=peer.to_string())
        if best.kind is LinkKind.DIRECT:
            return best.address
        return (await self.link(peer, relays)).address

    # -- hole punching --------------------------------------------------------------------
    def _rendezvous(self, link: PeerLink | None) -> RelayAddress | None:
        if link is not None and link.current_relay is not None:
            return link.current_relay
        if link is not None and link.relays:
            return link.relays[0]
        held = self.reserver.held() if self.reserver is not None else []
        return held[0] if held else None

    async def upgrade(self, peer: PeerID) -> bool:
        """Try to replace the relayed link to ``peer`` by a punched one; True on success."""
        link = self.links.get(peer.raw)
        relay = self._rendezvous(link)
        if link is None or relay is None:
            return False
        loop = asyncio.get_running_loop()
        port = _free_port()
        try:
            mine = await probe(
                self.runtime,
                relay.address,
                relay.peer_id,
                port,
                timeout_s=self.config.probe_timeout_s,
            )
            if mine.observed is None:
                return False
            stub = self.runtime.stub(relay_pb2_grpc.RelayStub, link.address, peer)
            delay_ms = int(self.config.punch_delay_s * 1000)
            sent = loop.time()
            reply = await stub.Punch(
                relay_pb2.PunchRequest(
                    observed=f"{mine.observed[0]}:{mine.observed[1]}", delay_ms=delay_ms
                ),
                timeout_s=self.config.probe_timeout_s * 2,
            )
            if not reply.observed:
                return False
            target = parse_address(reply.observed)
            await asyncio.sleep(max(0.0, delay_ms / 1000 - (loop.time() - sent) / 2))
            result = await self._punch(port, target, self.config.punch)
        except NetworkError as exc:
            _log.info("punch to %s failed: %r", peer.short(), exc)
            return False
        # retire the pooled channel first: a call issued right after the switch must not
        # go out on the aborted relayed connection before gRPC has noticed it is gone
        pool = self.runtime.pool
        with contextlib.suppress(NetworkError):
            pool.retire(await pool.get(link.address, peer, self.config.probe_timeout_s))
        await link.use_punched(result.sock)
        return True

    async def _respond_punch(
        self, caller: PeerID, request: relay_pb2.PunchRequest
    ) -> relay_pb2.PunchReply:
        if self.verdict is not None and self.verdict.mapping == "symmetric":
            return relay_pb2.PunchReply(observed="")
        if self._punching_in >= self.config.max_punches_in_flight:
            return relay_pb2.PunchReply(observed="")
        dialer = parse_address(request.observed)
        relay = self._rendezvous(None)
        if relay is None:
            return relay_pb2.PunchReply(observed="")
        port = _free_port()
        mine = await probe(
            self.runtime, relay.address, relay.peer_id, port, timeout_s=self.config.probe_timeout_s
        )
        if mine.observed is None:
            return relay_pb2.PunchReply(observed="")
        delay_s = min(request.delay_ms, 5000) / 1000
        self._tasks.spawn(self._punch_in(port, dialer, delay_s), name="punch-in")
        return relay_pb2.PunchReply(observed=f"{mine.observed[0]}:{mine.observed[1]}")

    async def _punch_in(self, port: int, dialer: tuple[str, int], delay_s: float) -> None:
        self._punching_in += 1
        try:
            await asyncio.sleep(delay_s)  # the agreed start time, not synchronisation
            result = await self._punch(port, dialer, self.config.punch)
        except NetworkError as exc:
            _log.info("incoming punch from %s failed: %r", dialer, exc)
            return
        finally:
            self._punching_in -= 1
        unix_path = self.runtime.unix_path
        if unix_path is None:
            result.sock.close()
            return
        self.punched_in += 1
        streams = await asyncio.open_connection(sock=result.sock)
        await bridge_to_unix(streams, unix_path)

    # -- reachability ---------------------------------------------------------------------
    async def check_reachability(
        self, helpers: list[RelayAddress], advertised: list[str]
    ) -> Verdict:
        """Ask ``helpers`` (concurrently, each bounded) to dial back ``advertised``.

        Names are resolved first: a helper dials only the IP it saw us come from, so an
        address announced by name would never be tried and would read as unreachable.
        """
        port = _free_port()
        asked = tuple([await _resolved(a, self.config.probe_timeout_s) for a in advertised])
        results = await asyncio.gather(
            *(
                probe(
                    self.runtime,
                    h.address,
                    h.peer_id,
                    port,
                    asked,
                    timeout_s=self.config.probe_timeout_s,
                )
                for h in helpers
            ),
            return_exceptions=True,
        )
        now = time.monotonic()
        reports = []
        for result in results:
            if isinstance(result, NetworkError):
                continue
            if isinstance(result, BaseException):
                raise result
            reports.append(result.report(asked, now))
        self.verdict = assess(reports, now, self.config.reachability)
        return self.verdict


async def _resolved(address: str, timeout_s: float) -> str:
    """``address`` with its host name replaced by its first IP (unchanged when it already
    is an IP, or when the name does not resolve within ``timeout_s``)."""
    parsed = split_host_port(address)
    if parsed is None:
        return address
    bare, port = parsed
    try:
        ipaddress.ip_address(bare)
        return address
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await within(loop.getaddrinfo(bare, port, type=socket.SOCK_STREAM), timeout_s)
    except (OSError, TimeoutError):
        return address
    ip = str(infos[0][4][0]) if infos else ""
    if not ip:
        return address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
