"""`shoal bench shares`: all-reduce rounds over uneven links, by how parts are shared out.

Builds a testbed of ``--peers`` public hosts (needs root, iproute2, iptables): one slow
host whose upload is capped at ``--slow-up`` Mbit/s and its download at ``--slow-down``,
and fast hosts capped at ``--fast`` Mbit/s each way. One averaging peer process runs in
each host, and rounds of a ``--params`` fp32 all-reduce alternate between ways of sharing
out the parts to reduce:

- ``equal``: every peer reduces the same share (the baseline);
- ``measured``: shares planned (``plan_shares``) from the uplinks and downlinks the peers
  measured in earlier rounds, averaged as a swarm does (not rounded to the half-octave
  grid a swarm announces);
- ``client``: the slow peer in client mode (it reduces nothing).

Two link sets run in one invocation: ``asym`` (the slow host's download at the fast rate,
as on most home links) and ``sym`` (its download as slow as its upload). For each the
result holds the median round time per way, its ratio to ``equal`` and the last shares
``measured`` used.

    shoal bench shares [--peers 4] [--params 1000000] [--rounds 3] [--slow-up 20]
    {"bench": "shares", "asym": {"equal_s": .., "measured_s": .., "client_s": .., ...}, ...}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from shoal.errors import ConfigError
from shoal.parallel.data.loopback import LoopbackSwarm, Placement
from shoal.parallel.data.partition import plan_shares
from shoal.testbed import Public, Testbed, Topology
from shoal.testbed.netns import missing_tools
from shoal.train.swarm_round_config import moving_average

WAYS = ("equal", "measured", "client")
SLOW = 0  # the slow peer's rank


def _log(msg: str) -> None:
    print(f"[shares] {msg}", file=sys.stderr, flush=True)


class _Rounds:
    """Rounds of one link set; keeps the peers' measured links (EWMA, as a swarm does)."""

    def __init__(self, swarm: LoopbackSwarm, numel: int) -> None:
        self.swarm, self.numel, self.k = swarm, numel, 0
        n = len(swarm.procs)
        self.measured: dict[str, list[float | None]] = {
            "uplink_bps": [None] * n,
            "downlink_bps": [None] * n,
        }

    def links(self, way: str) -> tuple[list[float], list[float]] | None:
        ups, downs = self.measured["uplink_bps"], self.measured["downlink_bps"]
        if way != "measured" or None in ups:
            return None
        return [float(u or 0) for u in ups], [float(d or 0) for d in downs]

    def run(self, way: str) -> float:
        """Seconds of one round (slowest peer) shared out ``way``."""
        n = len(self.swarm.procs)
        clients = (SLOW,) if way == "client" else ()
        self.swarm.configure(self.numel, seed=0, clients=clients, links=self.links(way))
        self.swarm.start_round(self.k, timeout_s=120.0)
        replies = [self.swarm.read(i, 180.0) for i in range(n)]
        self.k += 1
        if not all(r["ok"] for r in replies):
            raise RuntimeError(f"{way} round failed: {[r['reason'] for r in replies]}")
        for key, values in self.measured.items():
            for i, reply in enumerate(replies):
                values[i] = moving_average(values[i], reply.get(key))
        return max(r["seconds"] for r in replies)


def _link_set(args: argparse.Namespace, slow_down: float) -> dict[str, Any]:
    hosts = [Public(name="slow", rate_mbit=slow_down, up_mbit=args.slow_up)]
    hosts += [Public(name=f"fast{i}", rate_mbit=args.fast) for i in range(1, args.peers)]
    with Testbed(Topology(hosts=hosts)) as bed:
        places = [
            Placement(bed.hosts[h.name].address, bed.hosts[h.name].argv_prefix) for h in hosts
        ]
        swarm = LoopbackSwarm(args.peers, placements=places)
        try:
            rounds = _Rounds(swarm, args.params)
            rounds.run("equal")  # warm-up: connections, buffers, the first uplink samples
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for k in range(args.rounds):
                order = WAYS[k % len(WAYS) :] + WAYS[: k % len(WAYS)]  # each way goes first
                for way in order:
                    times[way].append(rounds.run(way))
            measured = rounds.links("measured")
        finally:
            swarm.close()
    _log(f"slow down {slow_down:g} Mbit/s: {times}")
    result: dict[str, Any] = {"slow_up_mbit": args.slow_up, "slow_down_mbit": slow_down}
    for way in WAYS:
        result[f"{way}_s"] = round(statistics.median(times[way]), 3)
    for way in WAYS[1:]:
        result[f"{way}_vs_equal"] = round(result[f"{way}_s"] / result["equal_s"], 3)
    if measured is not None:
        result["up_mbit"] = [round(b / 1e6, 1) for b in measured[0]]
        result["down_mbit"] = [round(b / 1e6, 1) for b in measured[1]]
        result["measured_shares"] = [round(s, 3) for s in plan_shares(*measured)]
    return result


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="shoal bench shares")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-up", type=float, default=20.0, help="Slow host upload, Mbit/s.")
    parser.add_argument("--fast", type=float, default=200.0, help="Fast hosts, Mbit/s.")
    parser.add_argument("--json", action="store_true", help="(always on) print one JSON line")
    args = parser.parse_args(argv)
    if args.peers < 3 or args.params < args.peers or args.rounds < 1:
        raise SystemExit("need --peers >= 3, --params >= --peers, --rounds >= 1")
    if os.geteuid() != 0:
        raise ConfigError("bench shares builds network namespaces: run it as root")
    missing = missing_tools()
    if missing:
        raise ConfigError(f"bench shares needs {', '.join(missing)} (Debian: make system-deps)")
    _log(f"{args.peers} peers, {args.params} fp32 params, {args.rounds} rounds per way")
    return {
        "bench": "shares",
        "peers": args.peers,
        "params": args.params,
        "fast_mbit": args.fast,
        "asym": _link_set(args, slow_down=args.fast),
        "sym": _link_set(args, slow_down=args.slow_up),
    }
