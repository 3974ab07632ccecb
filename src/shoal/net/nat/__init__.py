"""NAT traversal: reachability, relays, hole punching, link routing, byte-stream bridges.

See README.md in this folder.
"""

from shoal.net.nat.bridge import LocalEndpoint, SpliceStats, bridge_to_unix, splice
from shoal.net.nat.limits import RelayConfig, TokenBucket
from shoal.net.nat.punch import PunchConfig, PunchResult, punch, reusable_socket
from shoal.net.nat.reachability import (
    DialBackReport,
    Reachability,
    ReachabilityConfig,
    Verdict,
    assess,
)
from shoal.net.nat.reserve import RelayAddress, ReserverConfig
from shoal.net.nat.routing import Link, LinkKind, choose, ranked
from shoal.net.nat.traversal import Traversal, TraversalConfig

__all__ = [
    "DialBackReport",
    "Link",
    "LinkKind",
    "LocalEndpoint",
    "PunchConfig",
    "PunchResult",
    "Reachability",
    "ReachabilityConfig",
    "RelayAddress",
    "RelayConfig",
    "ReserverConfig",
    "SpliceStats",
    "TokenBucket",
    "Traversal",
    "TraversalConfig",
    "Verdict",
    "assess",
    "bridge_to_unix",
    "choose",
    "punch",
    "ranked",
    "reusable_socket",
    "splice",
]
