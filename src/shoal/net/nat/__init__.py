"""NAT traversal: reachability verdicts, TCP hole punching, and byte-stream bridges.

See README.md in this folder.
"""

from shoal.net.nat.bridge import LocalEndpoint, SpliceStats, bridge_to_unix, splice
from shoal.net.nat.punch import PunchConfig, PunchResult, punch, reusable_socket
from shoal.net.nat.reachability import (
    DialBackReport,
    Reachability,
    ReachabilityConfig,
    Verdict,
    assess,
)

__all__ = [
    "DialBackReport",
    "LocalEndpoint",
    "PunchConfig",
    "PunchResult",
    "Reachability",
    "ReachabilityConfig",
    "SpliceStats",
    "Verdict",
    "assess",
    "bridge_to_unix",
    "punch",
    "reusable_socket",
    "splice",
]
