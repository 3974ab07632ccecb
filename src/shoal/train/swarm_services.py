"""The network side of a swarm peer: runtime, DHT, membership, monitor, state serving.

``PeerServices.start(opts, identity, emit)`` brings them up in order (runtime and the
``Relay`` service's dial-back → reachability check → DHT and bootstrap → membership
heartbeats → monitor and summary publisher); ``attach_state``
adds the background checkpointer, the State service and its DHT announcements once the
peer knows its starting step. ``close()`` takes everything down in reverse order, is
idempotent and bounded in time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.dht.peer import DHT
from shoal.errors import ConfigError, NetworkError, ProtocolViolation, ShoalError
from shoal.monitor import DhtSummaryStore, PeerMonitor, SummaryPublisher
from shoal.monitor.config import EventLogConfig, MetricsConfig, MonitorConfig, SwarmViewConfig
from shoal.monitor.traffic import net_traffic_provider
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.aio import within
from shoal.net.config import RetryPolicy, is_host_port
from shoal.net.identity import PeerID
from shoal.net.nat.limits import RelayConfig
from shoal.net.nat.reserve import RelayAddress
from shoal.net.nat.traversal import Traversal, TraversalConfig
from shoal.parallel.data.dht_board import BOARD_VERSION
from shoal.state.announce import RefusedVersions, StateAnnouncer, state_key
from shoal.state.background import BackgroundCheckpointer, CheckpointerConfig, SavedCheckpoint
from shoal.state.sync_service import StateServer
from shoal.swarm.config import SwarmConfig
from shoal.swarm.membership import Membership
from shoal.swarm.peerinfo import PeerInfo, Reachability
from shoal.train.config import TrainConfig, with_overrides
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round_config import MEMBERSHIP_READ_S

__all__ = [
    "PeerServices",
    "TrainersView",
    "bytes_by_service",
    "bytes_sent",
    "round_scope",
    "scope_difference",
    "state_scope",
]

log = logging.getLogger(__name__)

_JOIN_RETRY = RetryPolicy(initial_s=0.3, max_s=3.0, attempts=10, deadline_s=30.0)
_MAX_DIAL_BACK_HELPERS = 4
_PROBE_TIMEOUT_S = 5.0
_TRAINER_ROLE = "trainer:"
"""Membership role of a trainer: ``trainer:<round scope>`` (the scope starts with the mode)."""
_RESERVE_TIMEOUT_S = 10.0
RELAYED = "relay:"
"""Board addresses of peers reached through a relay: ``relay:<relay host:port>``."""


def _reserve_relay(runtime: NetRuntime, nat: Traversal, join: tuple[str, ...]) -> str | None:
    """A relay reservation at one of the join peers (those started with ``--relay``), or
    None (the reservation attempts stop) when none grants one in time."""

    async def reserve() -> str | None:
        reserver = nat.reserve([RelayAddress(a) for a in join[:_MAX_DIAL_BACK_HELPERS]])
        try:
            held = await reserver.wait_held(1, _RESERVE_TIMEOUT_S)
        except TimeoutError:
            await reserver.close()
            nat.reserver = None
            return None
        return held[0].address

    try:
        return runtime.run(reserve(), timeout_s=_RESERVE_TIMEOUT_S + 5.0)
    except (ShoalError, TimeoutError) as exc:
        log.warning("no relay reservation: %s", exc)
        return None


def _reachability(runtime: NetRuntime, nat: Traversal, join: tuple[str, ...]) -> dict[str, Any]:
    """Ask the join addresses to dial us back; ``client_mode`` when some tried and none
    reached us. One helper suffices here (unlike a public-address verdict): a lying one can
    only make us a client, which costs the swarm one reducer, not correctness."""
    helpers = [RelayAddress(a) for a in join[:_MAX_DIAL_BACK_HELPERS]]
    verdict = runtime.run(
        nat.check_reachability(helpers, [runtime.address]), timeout_s=_PROBE_TIMEOUT_S + 5.0
    )
    return {
        "reached": verdict.reached,
        "unreached": verdict.unreached,
        "mapping": verdict.mapping,
        "client_mode": verdict.unreached > 0 and verdict.reached == 0,
    }


def _model_tag(opts: PeerOptions) -> str:
    shape = with_overrides(TrainConfig(), opts.model_config_overrides()).model.build()
    text = json.dumps(shape.to_dict(), sort_keys=True).encode()
    return hashlib.blake2b(text, digest_size=4).hexdigest()


def state_scope(opts: PeerOptions) -> str:
    """The mode and a hash of the :func:`round_scope`: snapshots are announced and fetched
    under it, so a peer takes state only from peers it averages with. Peers of any settings
    may share a swarm; one that took the outer state of a peer of other settings (another
    codec, rank, top-k fraction, aggregation or fragments: they never average together)
    met neither that peer's group nor its own again. And a fresher snapshot of another
    kind would hide the usable ones."""
    digest = hashlib.blake2b(round_scope(opts).encode(), digest_size=6).hexdigest()
    return f"{opts.mode}/{digest}"


def round_scope(opts: PeerOptions) -> str:
    """What peers must share to average together, e.g. ``diloco codec=int8 rank=0
    model=1a2b3c4d v=7``: the mode, the wire codec, a robust aggregation (a robust round
    fails where a mean succeeds), the low-rank factor rank (and the layout of its two
    exchanges), the top-k fraction and the
    streaming fragments (they change what a round's vector is) and how slots pick them
    (peers of another rule launch other fragments at once), the largest group (it
    cuts a round into groups), the
    model shape and the rendezvous board's format (peers of another format cannot read
    this one's entries: counting them would make every window wait for them). It prefixes
    every round key (hashed), and membership carries it (role ``trainer:<scope>``), so a peer can
    count the peers it could average with, and say which settings keep the others apart."""
    fields = {"codec": opts.wire_codec}
    if opts.aggregation != "mean":  # absent for the mean, so existing peers' keys stay
        fields["agg"] = opts.aggregation  # a robust round fails where a mean succeeds
    if opts.mode == "diloco":
        fields["rank"] = str(opts.rank)
        if opts.rank:  # dense values moved to the second exchange: older peers' vectors differ
            fields["lowrank"] = "2"
        if opts.topk:  # absent at 0, so the keys of dense peers stay as they were
            fields["topk"] = f"{opts.topk:g}"
    if opts.mode == "streaming":
        fields["frags"] = str(opts.fragments)
        # slots pick fragments by applied counts: peers that pick them by step count and
        # rotation would wait out every window for each other
        fields["sched"] = "counts"
    if opts.max_group_size != 64:  # absent at the default, so existing keys stay
        fields["group"] = str(opts.max_group_size)
    fields["model"] = _model_tag(opts)
    fields["v"] = str(BOARD_VERSION)
    return " ".join([opts.mode, *(f"{k}={v}" for k, v in fields.items())])


def scope_difference(mine: str, theirs: str) -> str:
    """The settings in which ``theirs`` differs from ``mine``, e.g. ``codec=fp16``."""
    a = dict(t.partition("=")[::2] for t in mine.split(" ")[1:])
    b = dict(t.partition("=")[::2] for t in theirs.split(" ")[1:])
    named = {
        "model": " (another model shape: --model, --layers or --width)",
        "v": " (another version of Shoal)",
        "lowrank": " (another version of Shoal)",
    }
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    if "rank" in differ:  # the layout follows the rank; a version apart only at equal ranks
        differ.discard("lowrank")
    return ", ".join(f"{k}={b.get(k, '?')}{named.get(k, '')}" for k in sorted(differ))


@dataclass(frozen=True, slots=True)
class TrainersView:
    """Live trainers of this peer's mode, from its membership view."""

    scope: str
    """This peer's :func:`round_scope`."""
    compatible: int
    """Peers that can average with this one, itself included (at least 1)."""
    other_scopes: tuple[str, ...] = ()
    """The scopes of the live peers of this mode that cannot (one entry per peer)."""

    def alone_reason(self) -> str:
        """Why no round can form, for a peer no other live peer can average with."""
        why = "alone: no other live peer found that trains with these settings"
        if not self.other_scopes:
            return why
        diffs = sorted({scope_difference(self.scope, s) or s for s in self.other_scopes})
        n = len(self.other_scopes)
        return (
            f"{why}; {n} live {self.scope.split(' ')[0]} peer{'s use' if n > 1 else ' uses'} "
            f"other settings: {'; '.join(diffs)} (here: {self.scope})"
        )


def bytes_sent(runtime: NetRuntime) -> int:
    """Every byte this peer sent (requests and responses), from the transport's accounting."""
    services = runtime.traffic.snapshot()["services"]
    return int(sum(c["bytes_out"] for c in services.values()))


def bytes_by_service(runtime: NetRuntime) -> dict[str, int]:
    """Bytes sent per service (e.g. ``shoal.v1.Averaging``, ``shoal.v1.DHT``)."""
    services = runtime.traffic.snapshot()["services"]
    return {name: int(c["bytes_out"]) for name, c in sorted(services.items())}


@dataclass(slots=True)
class PeerServices:
    opts: PeerOptions
    runtime: NetRuntime
    dht: DHT
    membership: Membership
    monitor: PeerMonitor
    publisher: SummaryPublisher
    state_key: bytes
    nat: Traversal
    scope: str
    """:func:`round_scope` of this peer (every round key starts with its hash)."""
    ckpt: BackgroundCheckpointer | None = None
    server: StateServer | None = None
    announcer: StateAnnouncer | None = None
    refused: RefusedVersions = field(default_factory=RefusedVersions)
    """Snapshots downloaded from the swarm that this peer could not use (not asked again)."""
    _closed: bool = field(default=False)

    @classmethod
    def start(
        cls, opts: PeerOptions, identity: Identity, emit: Callable[..., None]
    ) -> PeerServices:
        key = state_key(opts.swarm, scope=state_scope(opts))  # before anything starts
        runtime = NetRuntime(
            identity,
            NetConfig(
                host=opts.host, port=opts.port, announce=opts.announce, swarm_key=opts.swarm_key
            ),
        ).start()
        # What has started so far, stopped in reverse if a later step fails: a failed start
        # leaves no thread, server or heartbeat behind.
        undo: list[tuple[str, Callable[[], Any]]] = [("runtime", runtime.close)]
        try:
            # Every peer answers dial-backs: joiners learn from them whether they can be
            # reached. With --relay it also holds reservations for peers behind NATs.
            relay_cfg = RelayConfig() if opts.relay else None
            nat = Traversal(
                runtime, TraversalConfig(probe_timeout_s=_PROBE_TIMEOUT_S, relay=relay_cfg)
            )
            runtime.run(nat.start(), timeout_s=5.0)
            undo.append(("dial-back", lambda: runtime.run(nat.close(), timeout_s=3.0)))
            emit("listening", address=runtime.address, peer_id=runtime.peer_id.to_string())
            if opts.join and opts.check_reachability and not opts.client_mode:
                try:
                    found = _reachability(runtime, nat, opts.join)
                except (ShoalError, TimeoutError) as exc:
                    found = {"error": str(exc), "client_mode": False}
                if found["client_mode"]:  # behind a NAT: reduce through a relay if one helps
                    relay = _reserve_relay(runtime, nat, opts.join)
                    if relay is not None:
                        found.update(client_mode=False, relay=relay)
                emit("reachability", **found)
                if found["client_mode"]:
                    log.warning(
                        "nobody could dial %s back: averaging in client mode", runtime.address
                    )
                    opts = replace(opts, client_mode=True)
            # Others cannot count on reaching a client (nor a relayed peer, which only its
            # relay's circuits reach): it stays out of their routing tables.
            dht = DHT(runtime, serve=not opts.client_mode and nat.reserver is None)
            undo.append(("dht", dht.close))
            if opts.join:
                try:
                    dht.bootstrap(list(opts.join), _JOIN_RETRY)
                except ShoalError as exc:  # alone for now; others may find us later
                    log.warning("could not join via %s: %s", ",".join(opts.join), exc)
                    # on the event stream too: a mistyped address must not look like a start
                    emit("join_failed", join=list(opts.join), error=str(exc))
            hb = opts.heartbeat_s
            swarm_cfg = SwarmConfig(
                swarm=opts.swarm,
                heartbeat_interval_s=hb,
                refresh_interval_s=hb,
                ttl_s=max(4 * hb, 12.0),
                max_clock_skew_s=2.0,
            )
            roles = (_TRAINER_ROLE + round_scope(opts),)

            def info() -> PeerInfo:
                if nat.reserver is not None:
                    held = nat.reserver.held()
                    if held and held[0].peer_id is not None:
                        return PeerInfo(
                            reachability=Reachability.RELAYED,
                            relay=held[0].peer_id.raw,
                            roles=roles,
                        )
                    return PeerInfo(reachability=Reachability.UNKNOWN, roles=roles)
                if opts.client_mode:  # it dials out only; nobody should dial it
                    return PeerInfo(reachability=Reachability.UNKNOWN, roles=roles)
                return PeerInfo(
                    addresses=(runtime.address,), reachability=Reachability.DIRECT, roles=roles
                )

            membership = Membership(dht.node, swarm_cfg, info)
            runtime.run(_call(membership.start), timeout_s=5.0)
            undo.append(("membership", lambda: runtime.run(membership.close(), timeout_s=3.0)))
            view_cfg = SwarmViewConfig(
                swarm=opts.swarm, publish_interval_s=max(2.0, hb), record_ttl_s=max(30.0, 6 * hb)
            )
            monitor = PeerMonitor(
                MonitorConfig(
                    metrics=MetricsConfig(port=opts.metrics_port),
                    events=EventLogConfig(path=opts.events),
                    swarm_view=view_cfg,
                ),
                peer=runtime.peer_id.to_string(),
                traffic=net_traffic_provider(runtime.traffic),
            )
            undo.append(("monitor", monitor.close))
            try:
                metrics_port = monitor.start()
            except OSError as exc:  # e.g. --metrics-port already taken
                why = f"cannot serve metrics on port {opts.metrics_port}: {exc}"
                raise ConfigError(why) from exc
            if metrics_port is not None:
                emit("metrics", port=metrics_port)
            store = DhtSummaryStore(dht.node, config=view_cfg)
            publisher = SummaryPublisher(monitor.snapshot, store.publish, view_cfg)
            runtime.run(publisher.astart(), timeout_s=5.0)
        except BaseException:
            for name, fn in reversed(undo):
                try:
                    fn()
                except Exception as exc:  # keep stopping the rest
                    log.warning("stopping %s after a failed start: %s", name, exc)
            raise
        return cls(opts, runtime, dht, membership, monitor, publisher, key, nat, round_scope(opts))

    def round_address(self) -> str | None:
        """Where the members of a round dial this peer, or None: a client this round (it
        pulls its results). A peer behind a NAT is reached through its relay while it holds
        a reservation there."""
        if self.opts.client_mode:
            return None
        reserver = self.nat.reserver
        if reserver is None:
            return self.runtime.address
        held = reserver.held()
        return RELAYED + held[0].address if held else None

    async def dial_address(self, peer: PeerID, address: str) -> str:
        """What to dial for a member announced at ``address`` (a relayed peer: a local
        endpoint whose connections become circuits through its relay).

        Raises:
            ProtocolViolation: not ``host:port`` nor ``relay:host:port`` (a board entry
                could otherwise point this peer's dials at any target gRPC accepts).
        """
        relayed = address.startswith(RELAYED)
        target = address[len(RELAYED) :] if relayed else address
        if not is_host_port(target):
            raise ProtocolViolation(f"round member announced {address[:80]!r}")
        if not relayed:
            return address
        return await self.nat.address_for(peer, direct=[], relays=[RelayAddress(target)])

    async def fresh_view(self) -> TrainersView:
        """:meth:`view` from membership re-read just now (on the loop; bounded, falls back
        to the cached view). A round's window closes early on the count its peers expect,
        and a cached view may be a whole refresh interval behind the peers that just
        joined: the first round would then close without them."""
        with contextlib.suppress(NetworkError, TimeoutError):
            await within(self.membership.refresh(), MEMBERSHIP_READ_S)
        return self.view()

    def view(self) -> TrainersView:
        """Live peers of this mode, split by whether they can average with this one."""
        mode = _TRAINER_ROLE + self.opts.mode

        def scope_of(roles: tuple[str, ...]) -> str | None:  # its scope, if of our mode
            return next(
                (r[len(_TRAINER_ROLE) :] for r in roles if r == mode or r.startswith(mode + " ")),
                None,
            )

        others = [
            (m, scope)
            for m in self.membership.peers()
            if m.peer_id != self.runtime.peer_id and (scope := scope_of(m.info.roles)) is not None
        ]
        self.monitor.observe_members(
            [self.runtime.peer_id.to_string(), *(m.peer_id.to_string() for m, _ in others)]
        )
        apart = tuple(scope for _, scope in others if scope != self.scope)
        return TrainersView(self.scope, 1 + len(others) - len(apart), apart)

    def trainers(self) -> int:
        """Live peers that can average with this one (itself included), at least 1."""
        return self.view().compatible

    def attach_state(
        self,
        root: Path,
        on_saved: Callable[[SavedCheckpoint], None],
        on_error: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        """Background checkpointer + State service + announcements (a client-mode or
        relayed peer only checkpoints: joiners could not reach it, or only slowly)."""

        def saved(s: SavedCheckpoint) -> None:
            on_saved(s)
            if self.announcer is not None:
                self.announcer.notify()

        self.ckpt = BackgroundCheckpointer(
            root, CheckpointerConfig(keep_last=3), on_saved=saved, on_error=on_error
        )
        if self.opts.client_mode or self.nat.reserver is not None:
            return
        self.server = StateServer(self.runtime, self.ckpt.latest_served)
        self.announcer = StateAnnouncer(
            self.dht,
            self.state_key,
            self.ckpt.latest_served,
            address=self.runtime.address,
            ttl_s=max(10.0, 4 * self.opts.heartbeat_s),
        ).start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.ckpt is not None:
            ckpt = self.ckpt
            steps.append(("checkpointer", lambda: ckpt.close(timeout_s=10.0)))
        if self.announcer is not None:
            steps.append(("announcer", self.announcer.close))
        if self.server is not None:
            steps.append(("state server", self.server.close))
        steps += [
            ("publisher", lambda: self.runtime.run(self.publisher.aclose(), timeout_s=3.0)),
            ("monitor", self.monitor.close),
            ("membership", lambda: self.runtime.run(self.membership.close(), timeout_s=3.0)),
            ("dht", self.dht.close),
            ("dial-back", lambda: self.runtime.run(self.nat.close(), timeout_s=3.0)),
            ("runtime", self.runtime.close),
        ]
        for name, fn in steps:
            try:
                fn()
            except Exception as exc:  # keep closing the rest
                log.warning("closing %s failed: %s", name, exc)


async def _call(fn: Callable[[], None]) -> None:
    fn()
