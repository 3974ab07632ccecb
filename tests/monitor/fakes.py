"""Fakes shared by the monitor tests: a manual clock and a fixed swarm."""

from __future__ import annotations

from shoal.monitor.events import Event
from shoal.monitor.sources import SourceBatch
from shoal.monitor.summary import PeerSummary

NOW = 1_764_000_000.0


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def peer_id(i: int) -> str:
    return f"shpeer{i:02d}" + "x" * 44


def swarm_history(now: float = NOW, steps: int = 30) -> list[PeerSummary]:
    """Four trainers with falling loss (one of them a straggler behind a relay) and two
    stage servers, one of which is overloaded."""
    out = []
    for step in range(1, steps + 1):
        t = now - (steps - step) * 2.0
        for i in range(4):
            out.append(
                PeerSummary(
                    peer=peer_id(i),
                    t=t,
                    step=step * 10,
                    step_t=t,
                    loss=5.5 * (0.96**step) + 0.05 * i,
                    val_bpb=(2.5 * 0.98**step) if step % 5 == 0 else None,
                    samples_per_s=40.0 if i != 3 else 6.0,
                    tokens_per_s=40.0 * 512,
                    role="trainer",
                    reachability=("direct", "punched", "direct", "relayed")[i],
                    up_bps=50e6 if i != 3 else 0.4e6,
                    down_bps=100e6,
                    tx_bps=8e6,
                    rx_bps=9e6,
                    compute_frac=0.6,
                    comm_frac=0.25,
                    wait_frac=0.1,
                )
            )
    for j, (cap, demand) in enumerate(((60.0, 40.0), (20.0, 45.0))):
        out.append(
            PeerSummary(
                peer=peer_id(10 + j),
                t=now,
                step=0,
                step_t=now,
                role="stage_server",
                stage=j,
                samples_per_s=cap,
                demand_per_s=demand,
                reachability="direct",
                compute_frac=0.8,
                comm_frac=0.1,
                wait_frac=0.05,
            )
        )
    return out


class FakeSource:
    """Returns the whole history on the first poll, then nothing new."""

    name = "fake swarm"
    has_events = True

    def __init__(self, summaries: list[PeerSummary], events: list[Event] | None = None) -> None:
        self._pending = list(summaries)
        self._events = list(events or [])
        self.polls = 0

    async def poll(self) -> SourceBatch:
        self.polls += 1
        batch, self._pending = self._pending, []
        events, self._events = self._events, []
        return SourceBatch(summaries=batch, events=events)


def swarm_events(now: float = NOW) -> list[Event]:
    return [
        Event(now - 50, peer_id(3), "join", {"other": peer_id(0), "via": "relay"}),
        Event(now - 20, peer_id(1), "failure", {"what": "allreduce", "error": "peer timeout"}),
        Event(now - 19, peer_id(1), "retry", {"what": "allreduce", "attempt": 1}),
        Event(now - 5, peer_id(0), "checkpoint", {"step": 300, "path": "ckpt/300"}),
    ]
