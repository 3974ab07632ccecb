"""In-process DiLoCo replicas for ``shoal bench diloco --in-process``.

Runs ``peers`` replicas of the production :class:`~shoal.train.diloco.DiLoCo` loop in one
process, one thread each (torch releases the GIL), with the network round replaced by an
exact exchange: every replica's pseudo-gradient goes through the wire codec's encode and
decode (as a reducer receives it), the weighted mean goes through it again (as the
all-gather sends it), and every replica gets the same mean. No DHT, no transport, and no
failures but the ones asked for (``missed``: the last replica's rounds fail, and it then
takes replica 0's outer state through the real resync): the result isolates the algorithm
(H, outer optimizer, codec) from the system, and a sweep of settings costs minutes instead
of a swarm run each.

Bytes are the all-reduce payload only (``2 (N-1)/N`` of the encoded vector per replica
per round), so ``comm_reduction`` here is an upper bound of the swarm's, which also pays
for headers, the DHT and membership.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shoal.compress import Codec
from shoal.compress.registry import codec_by_name
from shoal.models.data.windows import Batch
from shoal.net.identity import PeerID
from shoal.train.config import TrainConfig
from shoal.train.diloco import DiLoCo, DiLoCoConfig, ResyncState
from shoal.train.diloco_topk import WIRE_CODEC, TopKAverager
from shoal.train.evaluate import evaluate_bpb
from shoal.train.outer import OuterConfig
from shoal.train.swarm_round_config import RoundOutcome
from shoal.train.trainer import Trainer

__all__ = ["Setting", "run_replicas"]

_WAIT_S = 600.0


@dataclass(frozen=True, slots=True)
class Setting:
    """One point of a sweep: ``H:outer_lr:outer_momentum[:topk]``."""

    local_steps: int
    outer_lr: float
    outer_momentum: float
    topk: float = 0.0
    """Fraction of each pseudo-gradient sent (top-k with error feedback); 0 = all of it."""

    @classmethod
    def parse(cls, text: str) -> Setting:
        try:
            h, lr, mom, *rest = text.split(":")
            if len(rest) > 1:
                raise ValueError(text)
            return cls(int(h), float(lr), float(mom), float(rest[0]) if rest else 0.0)
        except ValueError:
            raise SystemExit(
                f"bad setting {text!r}: expected H:outer_lr:momentum[:topk], e.g. 150:0.7:0.9 "
                "or 30:1:0:0.02"
            ) from None


class _Exchange:
    """The round every replica joins: one barrier, one mean, through the codec twice."""

    def __init__(self, peers: int, codec: Codec | None, missed: range = range(0)) -> None:
        self.codec = codec
        self.missed = missed
        self.inputs: list[tuple[torch.Tensor, float] | None] = [None] * peers
        self.indices = [0] * peers
        self.left_out = False
        """The last replica's input is not in this round's mean (set with the mean)."""
        self.mean = torch.empty(0)
        self.total_weight = 0.0
        self.wire_bytes = 0
        self.reduced = threading.Barrier(peers, action=self._reduce, timeout=_WAIT_S)
        self.copied = threading.Barrier(peers, timeout=_WAIT_S)
        self.ids = frozenset(PeerID(bytes([i]) * 32) for i in range(peers))

    def _roundtrip(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.codec is None:
            return t, t.numel() * 4
        enc = self.codec.encode(t)
        return self.codec.decode(enc).reshape(-1), enc.wire_bytes

    def _reduce(self) -> None:
        self.left_out = self.indices[-1] in self.missed
        inputs = [x for x in self.inputs if x is not None]
        if self.left_out:
            inputs.pop()
        n = len(inputs)
        total = sum(w for _, w in inputs)
        acc = torch.zeros_like(inputs[0][0])
        sent = 0
        for vec, w in inputs:
            decoded, nbytes = self._roundtrip(vec)
            acc.add_(decoded, alpha=w / total)
            sent += nbytes
        self.mean, mean_bytes = self._roundtrip(acc)
        # Butterfly: each replica sends (N-1)/N of its vector, and each of the N results
        # goes to the N-1 others.
        self.wire_bytes += int((n - 1) / n * sent + (n - 1) * mean_bytes)
        self.total_weight = total

    def average_fn(self, rank: int) -> Callable[[torch.Tensor, float, int], RoundOutcome]:
        def average(vector: torch.Tensor, weight: float, index: int) -> RoundOutcome:
            self.inputs[rank], self.indices[rank] = (vector, weight), index
            self.reduced.wait()  # the last arrival computes the mean
            left_out, last = self.left_out, len(self.inputs) - 1
            if not (left_out and rank == last):
                vector.copy_(self.mean)
            self.copied.wait()  # nobody starts the next round before all copied
            if left_out and rank == last:
                return RoundOutcome(False, reason="missed (--miss)")
            ids = self.ids - {PeerID(bytes([last]) * 32)} if left_out else self.ids
            return RoundOutcome(True, ids, self.total_weight, len(ids), "", {})

        return average


class _Published:
    """Replica 0's outer state after each of its rounds: what a replica that missed a round
    adopts when it asks the swarm (as a stale peer resyncs from a snapshot)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.state: ResyncState | None = None
        self.wanted: Callable[[], int] = lambda: 0
        self.closed = False

    def put(self, round_index: int, tensors: dict[str, torch.Tensor]) -> None:
        copied = {k: v.clone() for k, v in tensors.items()}
        with self.cond:
            self.state = ResyncState(round_index, copied)
            self.cond.notify_all()

    def take(self) -> ResyncState | None:
        """Replica 0's state once it finished the round the asking replica missed."""
        want = self.wanted()
        with self.cond:
            self.cond.wait_for(
                lambda: self.closed or (self.state is not None and self.state.round_index >= want),
                _WAIT_S,
            )
            return self.state

    def close(self) -> None:
        """A replica failed: nobody waits for replica 0's next state any more."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _sparsified(
    average: Callable[[torch.Tensor, float, int], RoundOutcome], topk: float
) -> Callable[[torch.Tensor, float, int], RoundOutcome]:
    """``average`` behind the production top-k averager (one per replica), or as it is."""
    if not topk:
        return average
    averager = TopKAverager(topk)
    return lambda vector, weight, index: averager.average(
        vector, weight, index, lambda v, w, i, _stage: average(v, w, i)
    )


def run_replicas(
    configs: list[TrainConfig],
    setting: Setting,
    codec_name: str,
    *,
    val: list[Batch],
    eval_every: int,
    log: Callable[[str], None],
    missed: range = range(0),
) -> dict[str, object]:
    """Train one replica per config to ``run.steps`` with DiLoCo; validate replica 0."""
    if setting.topk:
        codec_name = WIRE_CODEC
    codec = codec_by_name(codec_name) if codec_name != "none" else None
    exchange = _Exchange(len(configs), codec, missed)
    published = _Published()
    resyncs: list[int] = []  # states the missing replica adopted
    trainers = [Trainer(cfg, show_progress=False, log_lines=False) for cfg in configs]
    outer = OuterConfig(lr=setting.outer_lr, momentum=setting.outer_momentum)
    loops = [
        DiLoCo(
            list(t.model.parameters()),
            DiLoCoConfig(local_steps=setting.local_steps, outer=outer),
            _sparsified(exchange.average_fn(rank), setting.topk),
            resync=published.take if rank == len(trainers) - 1 and missed else None,
            on_resync=lambda _state: resyncs.append(1),
        )
        for rank, t in enumerate(trainers)
    ]
    published.wanted = lambda: loops[-1].round_index
    steps = configs[0].run.steps
    curve: list[dict[str, float]] = []
    rounds = [0] * len(trainers)
    errors: list[BaseException] = []

    def train(rank: int) -> None:
        trainer, loop = trainers[rank], loops[rank]
        try:
            while trainer.step < steps:
                trainer.train_step()
                report = loop.after_local_step(trainer.cfg.data.batch_size)
                if report is None:
                    continue
                rounds[rank] += 1
                if rank == 0 and missed:
                    published.put(loop.round_index, loop.state_tensors())
                if rank == 0 and rounds[0] % eval_every == 0:
                    bpb = evaluate_bpb(
                        trainer.model, val, device=trainer.device, autocast=trainer.autocast
                    )
                    curve.append({"step": trainer.step, "val_bpb": round(bpb, 4)})
                    log(
                        f"H={setting.local_steps} step {trainer.step} val_bpb {curve[-1]['val_bpb']}"
                    )
        except BaseException as exc:  # surfaced below; a broken barrier frees the others
            errors.append(exc)
            exchange.reduced.abort()
            exchange.copied.abort()
            published.close()

    threads = [threading.Thread(target=train, args=(r,), daemon=True) for r in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a replica failed: {errors[0]!r}") from errors[0]
    if not curve or curve[-1]["step"] != steps:  # local steps after the last round count too
        t0 = trainers[0]
        bpb = evaluate_bpb(t0.model, val, device=t0.device, autocast=t0.autocast)
        curve.append({"step": steps, "val_bpb": round(bpb, 4)})
    return {
        "rounds": rounds[0],
        "curve": curve,
        "wire_bytes": exchange.wire_bytes,
        "resyncs": len(resyncs),
    }
