"""Pipeline benchmark: 4 stage servers, unconstrained vs every link at 50 Mbit/s, 100 ms RTT.

    shoal bench pipeline --stages 4 --json

Layout: one stage server per stage and one trainer, each with its own ``NetRuntime`` (own
network loop thread) and DHT node, all in this one process: four server processes plus a
trainer would oversubscribe the 2-core machine with five torch thread pools, while here the
servers' compute threads and the trainer share the cores in one scheduler. The trainer reaches
every server through its own ``shoal.net.shaper.LinkShaper`` (token bucket + one-way delay
of half the RTT each way) hosted on a separate loop thread; all boundary traffic of a
micro-batch crosses those links (the trainer relays between stages, SWARM style).

Network runs on the same data (the embedded corpus), each with freshly seeded servers and up
to ``--inflight`` micro-batches in flight:

1. unconstrained links, codec ``none`` (the baseline);
2. shaped links, the compressed codec (``--codec``, default int8 blockwise);
3. shaped links, codec ``none`` (what compression buys on these links).

The machine is shared, so the three run ``--repeats`` times, interleaved (order reversed every
other round), and each configuration reports its best run.

``throughput_ratio`` = samples/s of run 2 / run 1; ``compression_ratio`` = boundary bytes on
the wire / the same tensors in fp32 (measured by the trainer in run 2).

``loss_gap`` = validation loss after ``--sim-steps`` micro-batches trained with the codec at
every boundary minus without, on the same batches and seed (``simulate.py``: the pipeline's
arithmetic run step-synchronously in one process, so that the gap is the codec's and not the
noise of asynchronous steps). ``loss_gap_by_codec`` gives it for the subspace codec as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from typing import Any

import torch

from shoal.dht.peer import DHT
from shoal.models import ModelConfig, model_config
from shoal.models.data import TrainWindows, load_corpus, val_batches
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.net.shaper import LinkShaper, ShaperConfig
from shoal.parallel.pipeline import (
    BoundaryCodec,
    PipelineTrainer,
    StageServer,
    StageServerConfig,
    TrainerConfig,
)
from shoal.parallel.pipeline.simulate import train_and_evaluate


def _log(msg: str) -> None:
    print(f"[bench pipeline] {msg}", file=sys.stderr, flush=True)


class _ShaperThread:
    """A loop thread hosting one LinkShaper per server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.shapers: list[LinkShaper] = []

    def add(self, target: str, rate_bit_s: float, delay_s: float) -> str:
        host, port = target.rsplit(":", 1)
        shaper = LinkShaper(
            ShaperConfig(
                target_host=host,
                target_port=int(port),
                up_rate_bit_s=rate_bit_s,
                down_rate_bit_s=rate_bit_s,
                up_delay_s=delay_s,
                down_delay_s=delay_s,
            )
        )
        asyncio.run_coroutine_threadsafe(shaper.start(), self.loop).result(10)
        self.shapers.append(shaper)
        h, p = shaper.address
        return f"{h}:{p}"

    def close(self) -> None:
        for shaper in self.shapers:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shaper.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _model(args: argparse.Namespace) -> ModelConfig:
    return model_config("tiny", n_layer=args.stages, d_model=args.d_model, max_seq_len=args.seq_len)


def _run(
    args: argparse.Namespace,
    codec: str,
    shaped: bool,
    data: list[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    cfg = _model(args)
    scfg = StageServerConfig(
        num_stages=args.stages,
        accumulate=args.accumulate,
        lr=args.lr,
        seed=args.seed,
        max_queue=4 * args.inflight,
        max_saved=8 * args.inflight,
        codec_rank=args.rank,
    )
    peers: list[tuple[NetRuntime, DHT]] = []
    servers: list[StageServer] = []
    shapers = _ShaperThread() if shaped else None
    try:

        def peer() -> tuple[NetRuntime, DHT]:
            runtime = NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False))
            runtime.start()
            dht = DHT(runtime)
            if peers:
                dht.bootstrap([peers[0][0].address])
            peers.append((runtime, dht))
            return runtime, dht

        for k in range(args.stages):
            runtime, dht = peer()
            servers.append(StageServer(runtime, dht, k, cfg, scfg).start())
        routes: dict[str, str] = {}
        if shapers is not None:
            for s in servers:
                routes[s.runtime.address] = shapers.add(
                    s.runtime.address, args.rate_mbit * 1e6, args.rtt_ms / 2000.0
                )
        runtime, dht = peer()
        trainer = PipelineTrainer(
            runtime,
            dht,
            cfg,
            TrainerConfig(
                num_stages=args.stages, codec=codec, max_inflight=args.inflight, call_budget_s=60.0
            ),
            address_map=lambda a: routes.get(a, a),
        )
        warm, timed = data[: args.warmup], data[args.warmup :]
        trainer.train_blocking(warm, timeout_s=600)
        wire0, fp0 = trainer.counters.wire_bytes, trainer.counters.fp32_bytes
        start = time.perf_counter()
        results = trainer.train_blocking(timed, timeout_s=600)
        seconds = time.perf_counter() - start
        errors = [r.error for r in results if r.error]
        losses = [r.loss for r in results]
        samples = sum(int(x.shape[0]) for x, _ in timed)
        out = {
            "samples_s": samples / seconds,
            "seconds": seconds,
            "errors": len(errors),
            "tail_loss": statistics.fmean(losses[-max(1, len(losses) // 4) :]),
            "wire_bytes": trainer.counters.wire_bytes - wire0,
            "fp32_bytes": trainer.counters.fp32_bytes - fp0,
            "failures": trainer.counters.failures,
            "busy": trainer.counters.busy,
        }
        _log(
            f"codec={codec} shaped={shaped}: {out['samples_s']:.1f} samples/s, "
            f"tail loss {out['tail_loss']:.4f}, errors {len(errors)}"
        )
        return out
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.close()
        for runtime, dht in reversed(peers):
            with contextlib.suppress(Exception):
                dht.close()
            runtime.close()
        if shapers is not None:
            shapers.close()


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="shoal bench pipeline")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--json", action="store_true", help="(the result is always one JSON line)")
    p.add_argument("--micro-batches", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--codec", default="int8")
    p.add_argument("--sim-steps", type=int, default=120)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rate-mbit", type=float, default=50.0)
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    corpus = load_corpus()
    windows = TrainWindows(
        corpus.train, seq_len=args.seq_len, batch_size=args.batch, seed=args.seed
    )
    data = []
    for _ in range(args.warmup + args.micro_batches):
        x, y = windows.next_batch()
        data.append((x.to(torch.uint8), y.to(torch.uint8)))
    plans = {"base": ("none", False), "shaped": (args.codec, True), "raw": ("none", True)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plans}
    for rep in range(args.repeats):  # interleaved; the best of each resists the others' load
        for name in list(plans) if rep % 2 == 0 else list(reversed(plans)):
            runs[name].append(_run(args, *plans[name], data))
    base, shaped, shaped_raw = (max(runs[n], key=lambda r: r["samples_s"]) for n in plans)

    cfg = _model(args)
    sim_train = [windows.next_batch() for _ in range(args.sim_steps)]
    val = val_batches(corpus.val, seq_len=args.seq_len, batch_size=args.batch, max_batches=8)
    val_loss: dict[str, float] = {}
    for codec in dict.fromkeys(["none", args.codec, "subspace-int8"]):
        val_loss[codec] = train_and_evaluate(
            cfg,
            args.stages,
            codec,
            sim_train,
            val,
            lr=args.lr,
            accumulate=args.accumulate,
            seed=args.seed,
            rank=args.rank,
        )
        _log(f"simulated {codec}: validation loss {val_loss[codec]:.4f}")
    sample = torch.randn(args.batch, args.seq_len, args.d_model)
    ratios = {}
    for codec in val_loss:
        payload = BoundaryCodec(codec, args.d_model, 0, rank=args.rank).encode(sample)
        ratios[codec] = round(
            sum(t.numel() * t.element_size() for t in payload) / (sample.numel() * 4), 4
        )
    return {
        "bench": "pipeline",
        "throughput_ratio": round(shaped["samples_s"] / base["samples_s"], 3),
        "compression_ratio": round(shaped["wire_bytes"] / max(1, shaped["fp32_bytes"]), 4),
        "loss_gap": round(val_loss[args.codec] - val_loss["none"], 4),
        "codec": args.codec,
        "stages": args.stages,
        "layout": "in-process: one NetRuntime + DHT node per server and trainer",
        "samples_s": {
            "unconstrained_none": round(base["samples_s"], 1),
            f"shaped_{args.codec}": round(shaped["samples_s"], 1),
            "shaped_none": round(shaped_raw["samples_s"], 1),
        },
        "loss_gap_by_codec": {c: round(v - val_loss["none"], 4) for c, v in val_loss.items()},
        "compression_by_codec": ratios,
        "val_loss_none": round(val_loss["none"], 4),
        "sim_steps": args.sim_steps,
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
        "repeats": args.repeats,
        "link": {"rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms},
    }
