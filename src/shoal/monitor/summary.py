"""The compact metric summary each peer publishes for the swarm view, and its wire form.

A summary is a msgpack map with short keys, at most :data:`MAX_SUMMARY_BYTES` bytes. It is
what a peer says about itself, so the decoder trusts nothing: size, types, ranges and string
lengths are checked before a :class:`PeerSummary` is built; anything else raises
:class:`~shoal.errors.ProtocolViolation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shoal.errors import ProtocolViolation

__all__ = [
    "MAX_SUMMARY_BYTES",
    "REACHABILITY",
    "PeerSummary",
    "decode_summary",
    "encode_summary",
    "summary_from_dict",
]

MAX_SUMMARY_BYTES = 1024
REACHABILITY = ("direct", "punched", "relayed", "unknown")
_MAX_TEXT = 64
_MAX_STAGE = 4096

# field name -> (wire key, kind)
_FIELDS: dict[str, tuple[str, str]] = {
    "peer": ("p", "text"),
    "t": ("t", "time"),
    "step": ("s", "count"),
    "step_t": ("st", "time"),
    "loss": ("l", "opt_float"),
    "val_bpb": ("v", "opt_float"),
    "samples_per_s": ("sps", "rate"),
    "tokens_per_s": ("tps", "rate"),
    "role": ("r", "text"),
    "stage": ("g", "opt_stage"),
    "reachability": ("re", "reach"),
    "up_bps": ("ub", "opt_rate"),
    "down_bps": ("db", "opt_rate"),
    "tx_bps": ("tb", "rate"),
    "rx_bps": ("rb", "rate"),
    "demand_per_s": ("dm", "opt_rate"),
    "compute_frac": ("fc", "frac"),
    "comm_frac": ("fm", "frac"),
    "wait_frac": ("fw", "frac"),
    "rounds": ("n", "count"),
    "failures": ("f", "count"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSummary:
    """One peer's state as published. Rates per second; bandwidth in bits per second."""

    peer: str
    t: float
    """Wall-clock time the summary was made."""
    step: int = 0
    step_t: float = 0.0
    """Wall-clock time the step last advanced (the stall alert reads it)."""
    loss: float | None = None
    val_bpb: float | None = None
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    role: str = "trainer"
    stage: int | None = None
    reachability: str = "unknown"
    up_bps: float | None = None
    """Estimated upload capacity of the peer's link, if measured."""
    down_bps: float | None = None
    tx_bps: float = 0.0
    """Observed send rate."""
    rx_bps: float = 0.0
    demand_per_s: float | None = None
    """For stage servers: samples/s requested of this server (served or queued)."""
    compute_frac: float = 0.0
    comm_frac: float = 0.0
    wait_frac: float = 0.0
    rounds: int = 0
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Not published; room for local-only annotations."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}


def encode_summary(summary: PeerSummary) -> bytes:
    """Pack a summary; raises ValueError if it does not fit in MAX_SUMMARY_BYTES."""
    wire = {key: getattr(summary, name) for name, (key, _) in _FIELDS.items()}
    data: bytes = msgpack.packb(wire, use_bin_type=True)
    if len(data) > MAX_SUMMARY_BYTES:
        raise ValueError(f"summary is {len(data)} bytes, more than {MAX_SUMMARY_BYTES}")
    return data


def _check(name: str, kind: str, value: Any) -> Any:
    def bad() -> ProtocolViolation:
        return ProtocolViolation(f"summary field {name!r} has invalid value {value!r:.60}")

    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "text":
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
            raise bad()
        return value
    if kind == "reach":
        if value not in REACHABILITY:
            raise bad()
        return value
    if kind == "count":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
            raise bad()
        return value
    if kind == "opt_stage":
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_STAGE:
            raise bad()
        return value
    if kind.startswith("opt_") and value is None:
        return None
    if not is_num or not math.isfinite(value):
        raise bad()
    value = float(value)
    if kind == "frac" and not 0.0 <= value <= 1.0:
        raise bad()
    if kind in ("rate", "opt_rate", "time") and value < 0:
        raise bad()
    return value


def decode_summary(data: bytes) -> PeerSummary:
    """Unpack and validate a published summary. Raises ProtocolViolation."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_SUMMARY_BYTES:
        raise ProtocolViolation("summary is not bytes or exceeds the size limit")
    try:
        wire = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_TEXT,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolViolation(f"summary is not valid msgpack: {exc}") from exc
    if not isinstance(wire, dict):
        raise ProtocolViolation("summary is not a map")
    return _build(wire, wire_keys=True)


def summary_from_dict(obj: Any) -> PeerSummary:
    """Validate a summary given by field name (as :meth:`PeerSummary.to_dict` writes it, e.g.
    in an event log). Raises ProtocolViolation."""
    if not isinstance(obj, dict):
        raise ProtocolViolation("summary is not a map")
    return _build(obj, wire_keys=False)


def _build(obj: dict[Any, Any], *, wire_keys: bool) -> PeerSummary:
    values: dict[str, Any] = {}
    for name, (key, kind) in _FIELDS.items():
        k = key if wire_keys else name
        if k not in obj:
            if name in ("peer", "t"):
                raise ProtocolViolation(f"summary lacks required field {name!r}")
            continue
        values[name] = _check(name, kind, obj[k])
    return PeerSummary(**values)
