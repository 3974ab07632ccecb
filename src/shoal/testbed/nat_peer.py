"""A real peer process for network-namespace tests and ``bench/nat.py``.

    python -m shoal.testbed.nat_peer --host 198.18.0.2 [--relay] [--dht-serve]
        [--seeds A:P,B:P] [--reserve A:P,B:P] [--swarm NAME]

Prints ``{"event": "ready", "id": <PeerID hex>, "address": ...}`` once serving, then reads
one JSON command per line on stdin and answers one JSON line on stdout (``{"ok": false,
"error": ...}`` on failure); each command runs with a deadline. Commands: ``dialback``,
``connect``, ``upgrade``, ``send``, ``ping``, ``average``, ``stats``, ``put``, ``get``,
``members``, ``quit`` (see ``Commands``). A DHT client (or node, with ``--dht-serve``) joins through
``--seeds`` and re-joins every ``--rejoin-s`` (so it heals after a partition); a peer with
``--reserve`` holds a relay reservation and advertises it under ``advert.relay_key``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from typing import Any

import torch

from shoal.dht.config import DHTConfig
from shoal.dht.peer import DHT
from shoal.errors import NetworkError, ShoalError
from shoal.net import tensor_frames
from shoal.net.aio import within
from shoal.net.config import NetConfig, RetryPolicy
from shoal.net.identity import Identity, PeerID
from shoal.net.nat import advert
from shoal.net.nat.limits import RelayConfig
from shoal.net.nat.reserve import RelayAddress, ReserverConfig
from shoal.net.nat.traversal import Traversal, TraversalConfig
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.runtime import NetRuntime
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.grpc_transport import GrpcTransport
from shoal.swarm.config import SwarmConfig
from shoal.swarm.membership import Membership
from shoal.swarm.peerinfo import PeerInfo, Reachability

__all__ = ["Commands", "main"]

_ADVERT_TTL_S = 120.0
_REJOIN = RetryPolicy(initial_s=0.2, max_s=1.0, attempts=1, deadline_s=3.0)


def _addresses(text: str) -> list[str]:
    return [a for a in text.split(",") if a]


class Commands:
    """Handlers of the control commands; each runs on the network loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # gRPC takes min_reconnect_backoff_ms as the connect timeout as well: 0.1 s is too
        # short for a delayed or relayed link on a busy machine
        config = NetConfig(
            host=args.host,
            port=args.port,
            idle_close_s=600.0,
            reconnect=RetryPolicy(initial_s=1.0, max_s=4.0),
        )
        self.runtime = NetRuntime(Identity.generate(), config).start()
        relay = RelayConfig(rate_bytes_s=args.relay_rate_bytes_s) if args.relay else None
        self.nat = Traversal(
            self.runtime,
            TraversalConfig(relay=relay, reserver=ReserverConfig(silence_s=10.0, retry_s=3.0)),
            resolve=self.resolve,
        )
        self.runtime.run(self.nat.start(), timeout_s=5)
        seeds = _addresses(args.seeds)
        dht_config = DHTConfig(rpc_timeout_s=1.0, lookup_timeout_s=4.0)
        self.dht: DHT | None = None
        self.membership: Membership | None = None
        if seeds or args.dht_serve:
            self.dht = DHT(self.runtime, dht_config, serve=args.dht_serve)
            if seeds:
                with contextlib.suppress(NetworkError):
                    self.dht.bootstrap(seeds, _REJOIN)
        self.runtime.run(self._start_loops(seeds), timeout_s=10)

    async def _start_loops(self, seeds: list[str]) -> None:
        if self.args.reserve:
            candidates = [RelayAddress(a) for a in _addresses(self.args.reserve)]
            self.nat.reserve(candidates, on_change=lambda _: self._advertise_soon())
        if self.dht is not None and seeds:
            self.runtime.spawn(self._rejoin(seeds), name="rejoin")
        if self.dht is not None and self.args.swarm:
            cfg = SwarmConfig(
                swarm=self.args.swarm,
                ttl_s=self.args.ttl_s,
                heartbeat_interval_s=self.args.ttl_s / 4,
                refresh_interval_s=1.0,
                max_clock_skew_s=self.args.ttl_s / 4,
                timeout_s=5.0,
            )
            self.membership = Membership(self.dht.node, cfg, self._info)
            self.membership.start()

    def _info(self) -> PeerInfo:
        held = self.nat.reserver.held() if self.nat.reserver is not None else []
        if held and held[0].peer_id is not None:
            relay = held[0].peer_id.raw
            return PeerInfo(reachability=Reachability.RELAYED, relay=relay, roles=("test",))
        return PeerInfo(
            addresses=(self.runtime.address,), reachability=Reachability.DIRECT, roles=("test",)
        )

    def _advertise_soon(self) -> None:
        if self.dht is not None:
            self.runtime.spawn(self._advertise(), name="advertise")

    async def _advertise(self) -> None:
        if self.dht is None or self.nat.reserver is None:
            return
        with contextlib.suppress(NetworkError, asyncio.TimeoutError):
            await advert.advertise(
                self.dht.node, self.runtime.peer_id, self.nat.reserver.held(), _ADVERT_TTL_S
            )

    async def _rejoin(self, seeds: list[str]) -> None:
        assert self.dht is not None
        rounds = 0
        while True:
            await asyncio.sleep(self.args.rejoin_s)
            rounds += 1
            with contextlib.suppress(NetworkError, asyncio.TimeoutError):
                await within(self.dht.node.bootstrap(seeds, _REJOIN), 8.0)
            if rounds % 10 == 0:
                await self._advertise()

    async def resolve(self, peer: PeerID) -> list[RelayAddress]:
        if self.dht is None:
            return []
        return await advert.resolve(self.dht.node, peer)

    # -- commands -------------------------------------------------------------------------
    async def cmd_dialback(self, helpers: list[str]) -> dict[str, Any]:
        verdict = await self.nat.check_reachability(
            [RelayAddress(h) for h in helpers], [self.runtime.address]
        )
        return {
            "status": verdict.status.value,
            "mapping": verdict.mapping,
            "reached": verdict.reached,
            "unreached": verdict.unreached,
            "public": [f"{h}:{p}" for h, p in verdict.public_addresses],
        }

    async def _target(
        self, peer: str, relays: list[str] | None, direct: list[str] | None
    ) -> tuple[PeerID, str]:
        pid = PeerID.from_bytes(bytes.fromhex(peer))
        known = [RelayAddress(a) for a in relays] if relays is not None else None
        if known is None and not direct:
            known = await self.resolve(pid)
        address = await self.nat.address_for(pid, direct=direct or [], relays=known or [])
        return pid, address

    def _kind(self, pid: PeerID, address: str) -> str:
        link = self.nat.links.get(pid.raw)
        if not address.startswith("unix:") or link is None or link.kind is None:
            return "direct"
        return link.kind.name.lower()

    async def cmd_ping(
        self,
        peer: str,
        relays: list[str] | None = None,
        direct: list[str] | None = None,
        timeout_s: float = 5.0,
    ) -> dict[str, Any]:
        start = time.monotonic()
        pid, address = await self._target(peer, relays, direct)
        stub = self.runtime.stub(peer_pb2_grpc.PeerStub, address, pid)
        await stub.Ping(peer_pb2.PingRequest(payload=b"ping"), timeout_s=timeout_s)
        link = self.nat.links.get(pid.raw)
        relay = link.current_relay.address if link and link.current_relay else ""
        return {
            "kind": self._kind(pid, address),
            "relay": relay,
            "ms": (time.monotonic() - start) * 1000,
        }

    async def cmd_upgrade(self, peer: str) -> dict[str, Any]:
        start = time.monotonic()
        pid = PeerID.from_bytes(bytes.fromhex(peer))
        punched = await self.nat.upgrade(pid)
        out = await self.cmd_ping(peer) if punched else {}
        return {**out, "punched": punched, "setup_ms": (time.monotonic() - start) * 1000}

    async def cmd_send(
        self, peer: str, nbytes: int, direct: list[str] | None = None
    ) -> dict[str, Any]:
        """Send ``nbytes`` with ``Peer.Absorb`` over the direct address or the current link."""
        pid = PeerID.from_bytes(bytes.fromhex(peer))
        link = self.nat.links.get(pid.raw)
        if direct:
            address = direct[0]
        elif link is not None:
            address = link.address
        else:
            raise ValueError("no link to that peer yet: ping it first")
        stub = self.runtime.stub(peer_pb2_grpc.PeerStub, address, pid)
        payload = torch.zeros(nbytes // 4, dtype=torch.float32)
        start = time.monotonic()
        ack = await stub.Absorb(tensor_frames(payload), timeout_s=120.0)
        seconds = time.monotonic() - start
        return {"bytes": ack.byte_length, "seconds": seconds, "kind": self._kind(pid, address)}

    async def cmd_average(
        self,
        round_id: str,
        members: list[list[Any]],
        numel: int,
        seed: int,
        round_s: float = 30.0,
        codec: str = "none",
    ) -> dict[str, Any]:
        """One all-reduce round with ``members`` (``[id hex, address or "", client]``).

        Member ``i`` averages ``randn(numel)`` from generator seed ``seed + i`` with weight
        ``i + 1``, so every member can check its result against the exact weighted mean of
        the contributors it is told: ``max_error`` is the largest difference of any element.
        """
        ids = [PeerID.from_bytes(bytes.fromhex(m[0])) for m in members]
        transport = GrpcTransport.for_runtime(self.runtime)
        for pid, (_, address, _) in zip(ids, members, strict=True):
            if address and pid != self.runtime.peer_id:
                transport.set_address(pid, address)
        rank = ids.index(self.runtime.peer_id)

        def vector(i: int) -> torch.Tensor:
            return torch.randn(numel, generator=torch.Generator().manual_seed(seed + i))

        group = GroupSpec(
            round_id.encode(),
            tuple(ids),
            (1e8,) * len(ids),
            tuple(bool(m[2]) for m in members),
        )
        averager = Averager(transport, wire_codec=codec)
        averager.prepare(group)
        result_vector = vector(rank)
        result = await averager.average(
            [result_vector], float(rank + 1), group=group, timeout_s=round_s
        )
        out: dict[str, Any] = {
            "round_ok": result.ok,
            "reason": result.reason,
            "excluded": {_hex(m)[:16]: why for m, why in result.excluded.items()},
            "reassigned": {str(j): _hex(m)[:16] for j, m in result.reassigned.items()},
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        }
        if result.ok:
            ranks = [i for i, pid in enumerate(ids) if pid in result.contributors]
            total = sum(i + 1 for i in ranks)
            expect = sum(vector(i).double() * (i + 1) for i in ranks) / total
            out["contributors"] = sorted(ids[i].raw.hex() for i in ranks)
            out["max_error"] = float((result_vector.double() - expect).abs().max())
            out["digest"] = hashlib.sha256(result_vector.numpy().tobytes()).hexdigest()
        return out

    async def cmd_stats(self) -> dict[str, Any]:
        core = self.nat.core.stats() if self.nat.core is not None else None
        reserver = self.nat.reserver
        return {
            "relay": core,
            "held": [r.address for r in reserver.held()] if reserver else [],
            "observed": reserver.observed() if reserver else [],
            "punched_in": self.nat.punched_in,
        }

    async def cmd_wait_held(self, count: int = 1, wait_s: float = 5.0) -> dict[str, Any]:
        """Wait up to ``wait_s`` until ``count`` reservations are held; the ones held then.

        ``wait_s`` must stay below the command's deadline, or the answer is a timeout error
        instead of the list.
        """
        if self.nat.reserver is None:
            raise ValueError("this peer reserves at no relay")
        try:
            held = await self.nat.reserver.wait_held(count, wait_s)
        except asyncio.TimeoutError:
            held = self.nat.reserver.held()
        return {"held": [r.address for r in held]}

    async def cmd_put(self, key: str, value: str) -> dict[str, Any]:
        assert self.dht is not None
        stored = await self.dht.node.store(key.encode(), value.encode(), time.time() + 300)
        return {"stored": stored}

    async def cmd_get(self, key: str) -> dict[str, Any]:
        assert self.dht is not None
        value = await self.dht.node.get(key.encode())
        return {"value": value.decode() if isinstance(value, bytes) else None}

    async def cmd_members(self) -> dict[str, Any]:
        if self.membership is None:
            return {"members": []}
        with contextlib.suppress(NetworkError, asyncio.TimeoutError):
            await self.membership.refresh()
        return {"members": sorted(m.peer_id.raw.hex() for m in self.membership.peers())}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.membership is not None:
                self.runtime.run(self.membership.close(), timeout_s=2)
            self.runtime.run(self.nat.close(), timeout_s=3)
        if self.dht is not None:
            self.dht.close()
        self.runtime.close()


def _hex(member: object) -> str:
    return member.raw.hex() if isinstance(member, PeerID) else str(member)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.testbed.nat_peer")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--relay", action="store_true")
    p.add_argument("--relay-rate-bytes-s", type=float, default=1e9)
    p.add_argument("--dht-serve", action="store_true")
    p.add_argument("--seeds", default="")
    p.add_argument("--reserve", default="")
    p.add_argument("--swarm", default="")
    p.add_argument("--ttl-s", type=float, default=20.0)
    p.add_argument("--rejoin-s", type=float, default=2.0)
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"[{args.host}] %(name)s: %(message)s")
    commands = Commands(args)
    rt = commands.runtime
    print(
        json.dumps({"event": "ready", "id": rt.peer_id.raw.hex(), "address": rt.address}),
        flush=True,
    )
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            op = request.pop("op")
            timeout_s = float(request.pop("deadline_s", 60.0))
            if op == "quit":
                break
            handler = getattr(commands, f"cmd_{op}", None)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {op!r}")
                answer = {"ok": True, **rt.run(handler(**request), timeout_s=timeout_s)}
            except (ShoalError, ValueError, TypeError) as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        commands.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
