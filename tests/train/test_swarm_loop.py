"""The swarm loop when one step ends several rounds (streaming: a round lands, the next
is abandoned as the peer stops)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from shoal.monitor import PeerMonitor
from shoal.monitor.config import MonitorConfig
from shoal.train.diloco import RoundReport
from shoal.train.diloco_streaming import StreamingDiLoCo
from shoal.train.diloco_streaming_strategy import StreamingStrategy
from shoal.train.outer import OuterConfig
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_peer import _loop
from shoal.train.swarm_round_config import RoundOutcome
from shoal.train.swarm_state import AppliedRounds
from shoal.train.swarm_strategy import StepOutcome


def _strategy(stop: threading.Event) -> tuple[StreamingStrategy, list]:
    """A streaming strategy (no network) and the futures of the rounds it launches; its
    fragment 1 round is launched as the peer is asked to stop, and never lands."""
    futures: list[concurrent.futures.Future[RoundOutcome]] = []

    def launch(vector, weight, index, fragment, fp):
        if fragment == 1:
            stop.set()  # the signal arrives as fragment 1's round starts
        futures.append(concurrent.futures.Future())
        return futures[-1]

    s = object.__new__(StreamingStrategy)
    s.trainer = SimpleNamespace(step=0, train_step=lambda: (None, torch.tensor(1.0)))
    s.opts = SimpleNamespace(batch_size=2)
    s.stop = stop
    s.applied_step = 0
    profiler = SimpleNamespace(compute=contextlib.nullcontext(), waiting=contextlib.nullcontext())
    s.services = SimpleNamespace(monitor=SimpleNamespace(profiler=profiler))
    s.streaming = StreamingDiLoCo(
        [torch.zeros(4), torch.zeros(4)],
        local_steps=4,
        fragments=2,
        overlap_steps=2,
        mix_alpha=0.5,
        outer=OuterConfig(),
        launch=launch,
        stop=stop,
        wait_timeout_s=1.0,
    )
    return s, futures


def _step(s: StreamingStrategy) -> StepOutcome:
    s.trainer.step += 1
    return s.step()


def test_a_step_that_ends_two_rounds_reports_both() -> None:
    # Only the last of them reached the loop: the applied round went unreported.
    stop = threading.Event()
    s, futures = _strategy(stop)
    assert [_step(s).reports for _ in range(3)] == [(), (), ()]  # fragment 0 launched at 2
    futures[0].set_result(RoundOutcome(True, contributors=frozenset({1, 2}), group_size=2))
    out = _step(s)  # step 4: fragment 0 applied, fragment 1 launched, and the stop comes
    assert stop.is_set() and futures[1].cancelled()
    assert [(r.ok, r.reason) for r in out.reports] == [(True, ""), (False, "stopping")]
    assert s.streaming.applied == [1, 0] and s.applied_step == 4


def test_a_restart_from_its_own_checkpoint_carries_the_steps_since_its_last_round() -> None:
    s, _ = _strategy(threading.Event())
    s.trainer.step = 30
    tensors = s.streaming.state_tensors()
    assert s.load_state(tensors, 7, applied_step=18)  # 12 steps since its last round
    assert s.streaming.stale and s.streaming.step == 30
    assert s.streaming.steps_carried == [12, 12] and s.streaming.samples == [24, 24]


class _Checkpointer:
    def __init__(self) -> None:
        self.saves: list[tuple[int, bool, bool]] = []
        self.last_taken_step: int | None = None

    def save(self, step, provider, *, write=True, serve=True):
        self.saves.append((step, write, serve))
        self.last_taken_step = step


def test_the_loop_notes_and_serves_every_applied_round_of_a_step(tmp_path: Path) -> None:
    ok = RoundReport(0, True, 2, 2, 4.0, "", {})
    abandoned = RoundReport(1, False, 0, 0, 0.0, "stopping", {})
    stop = threading.Event()
    trainer = SimpleNamespace(step=0)

    def step() -> StepOutcome:
        trainer.step += 1
        stop.set()
        return StepOutcome(1.0, 2, (ok, abandoned))

    strategy = SimpleNamespace(step=step, fingerprint=lambda: "f", round_index=2)
    runtime = SimpleNamespace(traffic=SimpleNamespace(snapshot=lambda: {"services": {}}))
    monitor = PeerMonitor(MonitorConfig(), peer="p")
    ckpt = _Checkpointer()
    services = SimpleNamespace(monitor=monitor, ckpt=ckpt, runtime=runtime, trainers=lambda: 2)
    opts = PeerOptions(run_dir=tmp_path, checkpoint_every_rounds=1, eval_every_rounds=0)
    events: list[tuple[str, dict]] = []
    applied = AppliedRounds(tmp_path, {})
    try:
        _loop(
            opts,
            trainer,  # type: ignore[arg-type]
            strategy,  # type: ignore[arg-type]
            services,  # type: ignore[arg-type]
            stop,
            lambda event, **fields: events.append((event, fields)),
            lambda averaged=True: None,
            applied,
        )
    finally:
        monitor.close()
    rounds = [(f["round"], f["ok"]) for e, f in events if e == "round"]
    assert rounds == [(0, True), (1, False)]
    assert applied.count == 1  # noted before its snapshot was taken
    assert ckpt.saves[0] == (1, True, True)  # the applied round's state, served
