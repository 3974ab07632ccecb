"""Swarm membership: who is here, what they serve, how fast (see README.md)."""

from shoal.swarm.config import SwarmConfig
from shoal.swarm.membership import Membership, swarm_keys
from shoal.swarm.peerinfo import PeerInfo, Reachability, decode_peer_info, encode_peer_info
from shoal.swarm.view import Member, MembershipView

__all__ = [
    "Member",
    "Membership",
    "MembershipView",
    "PeerInfo",
    "Reachability",
    "SwarmConfig",
    "decode_peer_info",
    "encode_peer_info",
    "swarm_keys",
]
