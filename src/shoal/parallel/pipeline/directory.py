"""Stage servers in the DHT: announcements written by servers, read by trainers and servers.

Key ``<prefix>/stage/<k>``, one subkey per server (its PeerID, enforced by the DHT's record
ownership). The value is a ``StageAnnouncement``; readers drop malformed ones, inactive ones
(the server left the stage), ones that claim another stage, and ones older than ``max_age_s``.
"""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError

from shoal.dht.node import DHTNode
from shoal.net.identity import PEER_ID_BYTES
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.parallel.pipeline.routing import Candidate

__all__ = ["announce", "parse_announcements", "read_stage", "stage_key"]

MAX_ADDRESS_CHARS = 256
MAX_THROUGHPUT = 1e9


def stage_key(prefix: str, stage: int) -> bytes:
    return f"{prefix}/stage/{stage}".encode()


async def announce(node: DHTNode, prefix: str, ann: pb.StageAnnouncement, expires_at: float) -> int:
    """Store our announcement for ``ann.stage``; returns replicas that accepted."""
    return await node.store(
        stage_key(prefix, ann.stage), ann.SerializeToString(), expires_at, subkey=b""
    )


def parse_announcements(value: object, stage: int, now: float, max_age_s: float) -> list[Candidate]:
    """Valid, active, fresh candidates from a DHT value (``{subkey: bytes}``)."""
    if not isinstance(value, dict):
        return []
    out = []
    for sub, raw in value.items():
        if len(sub) < PEER_ID_BYTES or not isinstance(raw, bytes):
            continue
        try:
            ann = pb.StageAnnouncement.FromString(raw)
        except DecodeError:
            continue
        if (
            not ann.active
            or ann.stage != stage
            or not 0 < len(ann.address) <= MAX_ADDRESS_CHARS
            or not math.isfinite(ann.throughput)
            or not 0 <= ann.throughput <= MAX_THROUGHPUT
            or not now - max_age_s <= ann.announced_at <= now + max_age_s
        ):
            continue
        out.append(
            Candidate(bytes(sub[:PEER_ID_BYTES]), ann.address, ann.throughput, ann.queue_length)
        )
    return sorted(out, key=lambda c: c.peer)


async def read_stage(
    node: DHTNode, prefix: str, stage: int, now: float, max_age_s: float
) -> list[Candidate]:
    """The servers of ``stage`` currently announced."""
    return parse_announcements(await node.get(stage_key(prefix, stage)), stage, now, max_age_s)
