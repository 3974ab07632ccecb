"""NAT traversal: reachability, relays, hole punching, link routing, byte-stream bridges.

See README.md in this folder. Only the light modules are re-exported here (importing the
package must stay cheap for small agents); import ``Traversal`` from
``shoal.net.nat.traversal`` and ``RelayAddress`` from ``shoal.net.nat.reserve``.
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
from shoal.net.nat.routing import Link, LinkKind, choose, ranked

__all__ = [
    "DialBackReport",
    "Link",
    "LinkKind",
    "LocalEndpoint",
    "PunchConfig",
    "PunchResult",
    "Reachability",
    "ReachabilityConfig",
    "RelayConfig",
    "SpliceStats",
    "TokenBucket",
    "Verdict",
    "assess",
    "bridge_to_unix",
    "choose",
    "punch",
    "ranked",
    "reusable_socket",
    "splice",
]
