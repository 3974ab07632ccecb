"""What ``shoal demo`` knows about its swarm: pure state folded from the peers' JSON lines.

``DemoConfig`` is the scenario (sizes, link shape, deadlines). ``SwarmState.apply(name,
event, now_s)`` folds one progress event of ``shoal peer --json`` (``listening``,
``recovered``, ``ready``, ``step``, ``round``, ``eval``, ``stopped``) into per-peer rows;
``summary()`` turns the state into the final report. No I/O, no clock: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ConfigError

__all__ = ["DemoConfig", "PeerRow", "SwarmState", "default_deadline_s", "fp32_allreduce_bytes"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """The demo scenario."""

    peers: int = 4
    """Training peers (one more process serves the bootstrap DHT node)."""
    steps: int = 100
    """Local steps every peer trains."""
    local_steps: int = 10
    """DiLoCo H: local steps per round."""
    mode: str = "diloco"
    """``diloco``, ``streaming`` or ``sync`` (passed to ``shoal peer --mode``)."""
    batch_size: int = 8
    seq_len: int = 64
    rate_mbit: float = 100.0
    """Bandwidth cap of each peer's inbound link, each direction."""
    delay_ms: float = 25.0
    """One-way latency added to each direction of each peer's inbound link."""
    kill_peer: int = 2
    """Index of the peer killed with SIGKILL (and restarted)."""
    kill_after_rounds: int = 1
    """The victim is killed once it has completed this many rounds."""
    window_s: float = 10.0
    """First matchmaking window of the peers."""
    heartbeat_s: float = 1.0
    """Membership heartbeat of the peers."""
    start_timeout_s: float = 60.0
    """Deadline for every process to be up (bootstrap, peers, dashboard)."""
    rejoin_timeout_s: float = 90.0
    """Deadline for the restarted peer to complete a round."""
    deadline_s: float = 170.0
    """Deadline of the whole run, start to summary."""
    monitor: bool = True
    """Start the dashboard."""

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool], ...] = (
            ("peers", self.peers >= 2),
            ("steps", self.steps >= self.local_steps),
            ("local_steps", self.local_steps >= 1),
            ("kill_peer", 0 <= self.kill_peer < self.peers),
            ("kill_after_rounds", self.kill_after_rounds >= 1),
            ("rate_mbit", self.rate_mbit > 0),
            ("delay_ms", 0 <= self.delay_ms <= 1000),
            ("window_s", self.window_s > 0),
            ("heartbeat_s", self.heartbeat_s > 0),
            ("start_timeout_s", self.start_timeout_s > 0),
            ("rejoin_timeout_s", self.rejoin_timeout_s > 0),
            ("deadline_s", self.deadline_s > 0),
        )
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"demo {name} is out of range: {getattr(self, name)!r}")
        if self.mode not in ("diloco", "streaming", "sync"):
            raise ConfigError(f"demo mode must be diloco, streaming or sync, got {self.mode!r}")


def default_deadline_s(mode: str, steps: int, local_steps: int) -> float:
    """The whole run's deadline when none is given: 170 s, plus 2 s for every round past
    10. A round costs about 1.5 s on the demo's links whatever the mode, and ``sync``
    averages at every step: its 100 rounds took 169.5 s of the 170 s deadline."""
    rounds = steps if mode == "sync" else -(-steps // max(1, local_steps))
    return 170.0 + 2.0 * max(0, rounds - 10)


def fp32_allreduce_bytes(params: int, peers: int, steps: int) -> int:
    """Bytes a ring all-reduce of fp32 gradients would send over ``steps`` peer-steps:
    each peer sends ``2 (n - 1) / n`` of the gradient per step."""
    if peers < 2:
        return 0
    return int(steps * 2 * (peers - 1) / peers * 4 * params)


@dataclass(slots=True)
class PeerRow:
    """One training peer as the demo sees it."""

    name: str
    status: str = "starting"
    step: int = 0
    loss: float | None = None
    rounds_ok: int = 0
    round_index: int = 0
    peers_seen: int = 0
    bytes_sent: int = 0
    """Bytes sent by the current incarnation."""
    bytes_earlier: int = 0
    """Bytes sent by earlier incarnations (up to their last report)."""
    val_bpb: float | None = None
    address: str = ""
    incarnation: int = 0
    started_s: float = 0.0
    recovered_from: str = ""
    recovered_step: int = 0
    ready_s: float | None = None
    """When the current incarnation was ready (state recovered, in the swarm)."""
    first_round_s: float | None = None
    """When the current incarnation first completed a round."""
    note: str = ""


@dataclass(slots=True)
class SwarmState:
    rows: dict[str, PeerRow] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Scenario milestones, in order (kill, restart, rejoin, ...)."""

    def row(self, name: str) -> PeerRow:
        if name not in self.rows:
            self.rows[name] = PeerRow(name)
        return self.rows[name]

    def restart(self, name: str, incarnation: int, now_s: float) -> None:
        """A new incarnation of ``name`` started: keep what the old one sent."""
        row = self.row(name)
        row.bytes_earlier += row.bytes_sent
        row.bytes_sent = 0
        row.incarnation = incarnation
        row.started_s = now_s
        row.first_round_s = None
        row.ready_s = None
        row.status = "restarting"
        row.rounds_ok = 0

    def apply(self, name: str, event: dict[str, Any], now_s: float) -> None:
        row = self.row(name)
        kind = event.get("event")
        if kind == "listening":
            row.status, row.address = "joining", str(event.get("address", ""))
        elif kind == "recovered":
            row.recovered_from = str(event.get("source", ""))
            row.recovered_step = int(event.get("step", 0))
            row.step = row.recovered_step
        elif kind == "ready":
            row.status = "training"
            row.ready_s = now_s
        elif kind == "step":
            row.step = int(event.get("step", row.step))
            row.loss = _float(event.get("loss"))
            row.peers_seen = int(event.get("peers", row.peers_seen))
            row.round_index = int(event.get("round", row.round_index))
        elif kind == "round":
            row.step = int(event.get("step", row.step))
            row.bytes_sent = int(event.get("bytes_sent", row.bytes_sent))
            if event.get("ok"):
                row.rounds_ok += 1
                row.round_index = int(event.get("round", row.round_index)) + 1
                row.status = "training"
                row.note = ""
                if row.first_round_s is None:
                    row.first_round_s = now_s
            else:
                row.note = f"round failed: {event.get('reason')}"
        elif kind == "eval":
            row.val_bpb = _float(event.get("val_bpb"))
        elif kind == "stopped":
            row.status = "done"
            row.step = int(event.get("step", row.step))
            row.val_bpb = _float(event.get("val_bpb"))
            row.bytes_sent = int(event.get("bytes_sent", row.bytes_sent))

    def total_bytes(self) -> int:
        return sum(r.bytes_sent + r.bytes_earlier for r in self.rows.values())

    def total_steps(self) -> int:
        return sum(r.step for r in self.rows.values())

    def final_bpb(self) -> float | None:
        vals = [r.val_bpb for r in self.rows.values() if r.val_bpb is not None]
        return sum(vals) / len(vals) if vals else None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
