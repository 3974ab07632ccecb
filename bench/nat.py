"""NAT traversal benchmark: link setup times and relayed vs direct throughput, in namespaces.

Builds a testbed (needs root, iproute2, iptables, /dev/net/tun): a public relay, a public
server, peers ``a`` and ``b`` behind two cone NATs and ``c`` behind a symmetric NAT, each a
``shoal.testbed.nat_peer`` process. From ``a`` it measures, in the same run:

- ``setup_ms.direct``: first call to the public server (TCP connect, handshake, ping);
- ``setup_ms.relayed``: first call to ``c`` through the relay (circuit, handshake, ping);
- ``setup_ms.punched``: upgrade of the relayed link to ``b`` (address probe, punch
  coordination, simultaneous open, new handshake, ping);
- ``punch_success``: fraction of ``--punch-trials`` upgrades to ``b`` that punched;
- ``relay_throughput_ratio``: throughput of ``--mib`` MiB to ``c`` through the relay over
  the same transfer to the public server directly (best of ``--reps`` alternating tries).

    shoal bench nat [--mib 16] [--punch-trials 3] [--reps 3] [--log-level INFO]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from shoal.errors import ConfigError
from shoal.testbed import Nat, Public, Testbed, Topology
from shoal.testbed.nat_driver import PeerProcess
from shoal.testbed.netns import missing_tools

PORT = 7700
MIB = 1 << 20


def _log(msg: str) -> None:
    print(f"[nat] {msg}", file=sys.stderr, flush=True)


def _check(answer: dict[str, Any], what: str) -> dict[str, Any]:
    if not answer.get("ok"):
        raise RuntimeError(f"{what} failed: {answer}")
    return answer


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="shoal bench nat")
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--punch-trials", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="alternating transfers of each kind")
    p.add_argument("--log-level", default="WARNING", help="of the peer processes (stderr)")
    p.add_argument("--json", action="store_true", help="accepted; the result is JSON anyway")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise ConfigError("bench nat builds network namespaces: run it as root")
    missing = missing_tools()
    if missing:
        raise ConfigError(f"bench nat needs {', '.join(missing)} (Debian: make system-deps)")
    topology = Topology(
        hosts=[
            Public(name="relay"),
            Public(name="server"),
            Nat(name="home1", kind="cone", hosts=["a"]),
            Nat(name="home2", kind="cone", hosts=["b"]),
            Nat(name="home3", kind="symmetric", hosts=["c"]),
        ]
    )
    with Testbed(topology) as bed:
        relay_at = f"{bed.hosts['relay'].address}:{PORT}"
        peers: dict[str, PeerProcess] = {}
        try:
            log = ["--log-level", args.log_level]
            for name in ("relay", "server", "a", "b", "c"):
                host = bed.hosts[name]
                extra = ["--port", str(PORT), "--relay"] if name in ("relay", "server") else []
                if name in ("a", "b", "c"):
                    extra = ["--reserve", relay_at]
                peers[name] = PeerProcess(name, host.popen, ["--host", host.address, *log, *extra])
            for proc in peers.values():
                proc.start()
            _log("peers ready")
            return _measure(peers, relay_at, args.mib, args.punch_trials, args.reps)
        finally:
            PeerProcess.stop_all(peers.values())


def _measure(
    peers: dict[str, PeerProcess], relay_at: str, mib: int, trials: int, reps: int
) -> dict[str, Any]:
    a, b, c, server = peers["a"], peers["b"], peers["c"], peers["server"]
    for name in ("b", "c"):
        _check(
            peers[name].call("wait_held", count=1, wait_s=8.0, timeout_s=10.0),
            f"reservation of {name}",
        )
    direct = _check(a.call("ping", peer=server.id, direct=[server.address]), "direct ping")
    relayed = _check(a.call("ping", peer=c.id, relays=[relay_at]), "relayed ping")
    _check(a.call("ping", peer=b.id, relays=[relay_at]), "relayed ping to b")
    punched_ms, successes = [], 0
    for _ in range(trials):
        up = a.call("upgrade", peer=b.id)
        if up.get("punched"):
            successes += 1
            punched_ms.append(up["setup_ms"])
        else:
            _log(f"upgrade did not punch: {up}")
    _log(f"direct {direct['ms']:.0f} ms, relayed {relayed['ms']:.0f} ms, punched {punched_ms}")
    nbytes = mib * MIB
    direct_s, relayed_s = [], []
    for _ in range(reps):  # alternate, keep the best of each (the machine is shared)
        direct_s.append(
            _check(
                a.call(
                    "send", peer=server.id, nbytes=nbytes, direct=[server.address], timeout_s=120
                ),
                "direct send",
            )["seconds"]
        )
        relayed_s.append(
            _check(a.call("send", peer=c.id, nbytes=nbytes, timeout_s=120), "relayed send")[
                "seconds"
            ]
        )
    best_direct, best_relayed = min(direct_s), min(relayed_s)
    _log(f"{mib} MiB: direct {direct_s} s, relayed {relayed_s} s")
    return {
        "bench": "nat",
        "punch_success": successes / trials if trials else 0.0,
        "setup_ms": {
            "direct": round(direct["ms"], 1),
            "punched": round(statistics.median(punched_ms), 1) if punched_ms else None,
            "relayed": round(relayed["ms"], 1),
        },
        "relay_throughput_ratio": round(best_direct / best_relayed, 3),
        "direct_MBps": round(nbytes / best_direct / 1e6, 1),
        "relayed_MBps": round(nbytes / best_relayed / 1e6, 1),
    }
