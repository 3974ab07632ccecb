"""Peer options checks, round keys, progress lines, and rounds abandoned on shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import pytest

from shoal.cli._peer_run import Printer
from shoal.errors import ConfigError
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round_config import RoundsConfig
from shoal.train.swarm_strategy import blocking_round, round_key


def test_peer_options_are_checked() -> None:
    PeerOptions(mode="diloco", local_steps=5, fragments=8)  # fragments only matter streaming
    with pytest.raises(ConfigError, match="mode"):
        PeerOptions(mode="async")
    with pytest.raises(ConfigError, match="fragments"):
        PeerOptions(mode="streaming", local_steps=5, fragments=8)
    with pytest.raises(ConfigError, match="fragments must be at most 64"):  # counts announced
        PeerOptions(mode="streaming", local_steps=200, fragments=65)
    with pytest.raises(ConfigError, match="--overlap-steps must be in \\[0, 2\\]"):
        PeerOptions(mode="streaming", local_steps=8, fragments=4, overlap_steps=3)
    # the default overlap fits small H (5 would be refused at -H 10 with 4 fragments)
    assert PeerOptions(mode="streaming", local_steps=10).overlap == 2
    assert PeerOptions(mode="streaming", local_steps=40).overlap == 5
    with pytest.raises(ConfigError, match="shard 4/4"):
        PeerOptions(shard_index=4, num_shards=4)
    with pytest.raises(ConfigError, match="wire_codec"):
        RoundsConfig(wire_codec="topk")
    with pytest.raises(ConfigError, match="--announce"):
        PeerOptions(host="0.0.0.0")
    PeerOptions(host="0.0.0.0", announce="198.18.0.7:31337")
    for bad, match in [
        ({"report_every": 0}, "report_every"),
        ({"threads": 0}, "threads"),
        ({"eval_batches": 0}, "eval_batches"),
        ({"rank": -1}, "rank"),
        ({"rank": 2, "mode": "streaming"}, "rank \\(low-rank averaging\\) is for mode diloco"),
        ({"wire_codec": "int3"}, "wire_codec must be one of none, fp16, int8, int4"),
        ({"topk": 1.0, "wire_codec": "sparse"}, "topk must be a fraction in \\[0, 1\\)"),
        ({"topk": 0.1, "mode": "sync", "wire_codec": "sparse"}, "is for mode diloco"),
        ({"topk": 0.1, "rank": 2, "wire_codec": "sparse"}, "choose one"),
        ({"topk": 0.1}, "needs wire_codec sparse, not int8"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"window_s": float("nan")}, "window_s must be > 0"),
        ({"heartbeat_s": 0.0}, "heartbeat_s must be > 0"),
        ({"metrics_port": -5}, "metrics_port"),
        ({"join": ("127.0.0.1",)}, "HOST:PORT"),
        ({"join": ("127.0.0.1:notaport",)}, "HOST:PORT"),
    ]:
        with pytest.raises(ConfigError, match=match):
            PeerOptions(**bad)
    PeerOptions(join=("127.0.0.1:31337", "peer.example:9"))
    PeerOptions(topk=0.01, wire_codec="sparse")


def test_round_keys_separate_modes_rounds_and_parameters() -> None:
    keys = {
        round_key("diloco", 3, "aa"),
        round_key("diloco", 3, "ab"),
        round_key("diloco", 4, "aa"),
        round_key("sync", 3, "aa"),
    }
    assert len(keys) == 4 and round_key("diloco", 3) == b"diloco/3"


def test_progress_lines_are_json_objects(capsys: pytest.CaptureFixture[str]) -> None:
    Printer(True)("round", round=2, ok=True, seconds={"allreduce": 0.1})
    Printer(False)("step", step=5, loss=1.5)
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0]) == {
        "event": "round",
        "round": 2,
        "ok": True,
        "seconds": {"allreduce": 0.1},
    }
    assert lines[1].split() == ["step", "step=5", "loss=1.5"]


class NeverRuntime:
    """Hands out futures that never finish, like a round stuck waiting for peers."""

    def __init__(self) -> None:
        self.futures: list[concurrent.futures.Future[object]] = []

    def submit(self, coro):  # type: ignore[no-untyped-def]
        coro.close()
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self.futures.append(fut)
        return fut


async def _never() -> None:
    await asyncio.sleep(3600)


def test_a_round_is_abandoned_promptly_when_the_peer_stops() -> None:
    runtime = NeverRuntime()
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    t0 = time.monotonic()
    outcome = blocking_round(runtime, _never(), stop=stop, timeout_s=60.0)  # type: ignore[arg-type]
    assert not outcome.ok and outcome.reason == "stopping"
    assert time.monotonic() - t0 < 5.0
    assert runtime.futures[0].cancelled()


def test_a_round_past_its_deadline_fails() -> None:
    runtime = NeverRuntime()
    outcome = blocking_round(runtime, _never(), stop=threading.Event(), timeout_s=0.2)  # type: ignore[arg-type]
    assert not outcome.ok and "no result" in outcome.reason
