"""Benchmark: DiLoCo over real peer processes against one process with the same total batch.

    shoal bench diloco [--peers 4] [--steps 600] [--local-steps 75] [--json]

Starts ``--peers`` ``shoal peer --mode diloco`` processes on 127.0.0.1 (the first one
bootstraps the swarm, the others join it; peer i trains on data shard i of N with
``--batch-size`` sequences per local step), then trains the same model in this process
for the same number of steps with ``peers x batch`` sequences per step (AdamW, same
learning rate and schedule). Both are evaluated on the same validation windows.

- ``bytes_sent``: every message byte the peers sent (gRPC payloads of averaging, DHT,
  membership, summaries, state announcements), from the transport's traffic accounting.
  HTTP/2 framing, call headers and TCP/IP headers are not in it; sampling the kernel's
  per-socket counts (``ss -ti``) during a 60-step run found about 4% more on the wire, and
  TCP/IP headers add about 3.6% on a 1500-byte MTU. ``ddp_fp32_bytes`` counts payload too.
- ``ddp_fp32_bytes``: what a ring all-reduce of fp32 gradients would send for the same steps:
  ``steps x peers x 2(N-1)/N x 4 bytes x parameters``.
- ``comm_reduction = ddp_fp32_bytes / bytes_sent``; ``loss_gap = (val_bpb - baseline) /
  baseline``. Curves (per-round validation of the swarm, baseline every round) go to stderr
  and into the JSON line. Validation uses ``--eval-batches`` batches of evenly spaced
  windows, the same for both sides; the default takes the whole embedded validation split
  (1,624 windows: with 64 windows, paired differences between two models have a standard
  error of about 0.011 on ``loss_gap``).
- ``rounds_ok`` is the fewest rounds any peer applied, ``rounds`` the rounds the schedule
  holds; ``ok`` is false when they differ (a failed round sends fewer bytes and would
  flatter ``comm_reduction``).

Defaults: H=75 with the int4 wire codec (8 rounds in 600 steps for the bytes int8 spends
on 4), outer SGD with lr 1.5 and no momentum, 10 s heartbeats. The in-process frontier
measured these best among the settings that stay above a 500x reduction; with so few
rounds Nesterov momentum (0.7/0.9, the library default for long runs) never builds up
and ends worse (see docs/peer.md).

``--in-process --settings 150:0.7:0.9,75:1:0,...`` runs the same replicas as threads of this
process with an exact exchange instead of the network (``_diloco_inproc.py``), once per
``H:outer_lr:outer_momentum`` setting, against one baseline, and prints the frontier:
``loss_gap`` and the payload-only ``comm_reduction`` of every setting. It separates what
the algorithm can reach from what the swarm adds, at a fraction of a swarm run's time.
With ``--miss ROUND:COUNT`` the last replica misses COUNT rounds from ROUND on (they fail
for it, the others average without it) and, after each, adopts replica 0's outer state
the way a stale peer resyncs: what a peer's return after an outage costs the swarm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from shoal.models.data import load_corpus, val_batches
from shoal.train.config import TrainConfig, with_overrides
from shoal.train.diloco_topk import WIRE_CODEC
from shoal.train.evaluate import evaluate_bpb
from shoal.train.trainer import Trainer


def _log(msg: str) -> None:
    print(f"bench diloco: {msg}", file=sys.stderr, flush=True)


class PeerProcess:
    """One ``shoal peer`` process and the JSON lines it printed."""

    def __init__(self, argv: list[str], name: str, stderr: Any = subprocess.DEVNULL) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.events: list[dict[str, Any]] = []
        self.address: str | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "listening":
                self.address = event["address"]
                self._listening.set()
            if event.get("event") == "round":
                _log(
                    f"{self.name} round {event['round']} ok={event['ok']} "
                    f"contributors={event['contributors']} step={event['step']} {event.get('reason', '')}"
                )

    def wait_listening(self, timeout_s: float) -> str:
        if not self._listening.wait(timeout_s) or self.address is None:
            raise RuntimeError(f"{self.name} did not start within {timeout_s} s")
        return self.address

    def wait(self, timeout_s: float) -> dict[str, Any]:
        self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5.0)
        stopped = [e for e in self.events if e.get("event") == "stopped"]
        if not stopped:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode} without a result")
        return stopped[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _peer_argv(args: argparse.Namespace, run_dir: Path, index: int, join: str | None) -> list[str]:
    argv = [sys.executable, "-m", "shoal.cli.main", "peer", "--mode", "diloco", "--json"]
    argv += [
        "--run-dir",
        str(run_dir),
        "--swarm",
        "bench-diloco",
        "--shard",
        f"{index}/{args.peers}",
    ]
    argv += ["--steps", str(args.steps), "--local-steps", str(args.local_steps)]
    argv += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    argv += ["--lr", str(args.lr), "--model", args.model, "--codec", args.codec]
    argv += ["--rank", str(args.rank), "--outer-lr", str(args.outer_lr)]
    if args.topk:
        argv += ["--topk", str(args.topk)]
    argv += ["--outer-momentum", str(args.outer_momentum)]
    argv += ["--window", str(args.window_s), "--heartbeat", str(args.heartbeat_s)]
    argv += ["--max-group-size", str(args.max_group_size)]
    argv += ["--checkpoint-every", "0", "--eval-every", str(args.eval_every)]
    argv += ["--eval-batches", str(args.eval_batches)]
    argv += ["--report-every", "50"]
    if join:
        argv += ["--join", join]
    return argv


def _train_config(
    args: argparse.Namespace, batch_size: int, run_dir: Path, shard: int | None = None
) -> TrainConfig:
    shard_keys = {} if shard is None else {"data.shard_index": shard, "data.num_shards": args.peers}
    return with_overrides(
        TrainConfig(),
        {
            **shard_keys,
            "model.name": args.model,
            "data.seq_len": args.seq_len,
            "data.batch_size": batch_size,
            "optim.lr": args.lr,
            "schedule.warmup_steps": 30,
            "run.steps": args.steps,
            "run.run_dir": str(run_dir),
            "run.threads": 1,
            "run.device": "cpu",
            "checkpoint.every_steps": 0,
        },
    )


def _baseline(args: argparse.Namespace, run_dir: Path) -> tuple[float, list[dict[str, float]]]:
    """One process, ``peers x batch`` sequences per step; val on the peers' windows."""
    cfg = _train_config(args, args.peers * args.batch_size, run_dir)
    trainer = Trainer(cfg, show_progress=False, log_lines=False)
    corpus = load_corpus(None, val_fraction=cfg.data.val_fraction)
    val = val_batches(
        corpus.val, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.eval_batches
    )
    curve = []
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % (args.local_steps * args.eval_every) == 0 or trainer.step == args.steps:
            bpb = evaluate_bpb(trainer.model, val, device=trainer.device, autocast=trainer.autocast)
            curve.append({"step": trainer.step, "val_bpb": round(bpb, 4)})
            _log(f"baseline step {trainer.step} val_bpb {bpb:.4f}")
    return curve[-1]["val_bpb"], curve


def _sum_services(results: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in results:
        for name, n in r.get("bytes_by_service", {}).items():
            total[name] = total.get(name, 0) + int(n)
    return total


def _ddp_fp32_bytes(args: argparse.Namespace, num_params: int) -> int:
    n = args.peers
    return int(args.steps * n * 2 * (n - 1) / n * 4 * num_params)


def _missed_rounds(text: str) -> range:
    try:
        start, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROUND:COUNT, e.g. 2:3, got {text!r}") from None
    if start < 0 or count < 1:
        raise argparse.ArgumentTypeError(f"ROUND must be >= 0 and COUNT >= 1, got {text!r}")
    return range(start, start + count)


def _in_process(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shoal_bench_diloco_inproc", Path(__file__).with_name("_diloco_inproc.py")
    )
    assert spec is not None and spec.loader is not None
    inproc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = inproc  # dataclasses look their module up by name
    spec.loader.exec_module(inproc)
    Setting, run_replicas = inproc.Setting, inproc.run_replicas

    text = args.settings or (
        f"{args.local_steps}:{args.outer_lr}:{args.outer_momentum}:{args.topk}"
    )
    settings = [Setting.parse(s) for s in text.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="shoal-bench-diloco-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        baseline, base_curve = _baseline(args, root / "baseline")
        base_s = time.monotonic() - t0
        corpus = load_corpus(None, val_fraction=TrainConfig().data.val_fraction)
        val = val_batches(
            corpus.val,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_batches=args.eval_batches,
        )
        configs = [
            _train_config(args, args.batch_size, root / f"p{i}", i) for i in range(args.peers)
        ]
        num_params = configs[0].model.build().num_params()
        ddp = _ddp_fp32_bytes(args, num_params)
        frontier = []
        for setting in settings:
            t1 = time.monotonic()
            out = run_replicas(
                configs,
                setting,
                args.codec,
                val=val,
                eval_every=args.eval_every,
                log=_log,
                missed=args.miss,
            )
            curve = out["curve"]
            val_bpb = curve[-1]["val_bpb"]
            wire = int(out["wire_bytes"])
            frontier.append(
                {
                    "local_steps": setting.local_steps,
                    "outer_lr": setting.outer_lr,
                    "outer_momentum": setting.outer_momentum,
                    "topk": setting.topk,
                    "rounds": out["rounds"],
                    "val_bpb": val_bpb,
                    "loss_gap": round((val_bpb - baseline) / baseline, 4),
                    "payload_bytes": wire,
                    "comm_reduction": round(ddp / max(1, wire), 1),
                    "curve": curve,
                    "seconds": round(time.monotonic() - t1, 1),
                }
            )
            if args.miss:  # states the replica that missed rounds adopted from replica 0
                frontier[-1]["resyncs"] = out["resyncs"]
            _log(f"setting {setting}: {frontier[-1]}")
    return {
        "bench": "diloco",
        "mode": "in-process",
        "baseline_val_bpb": round(baseline, 4),
        "ddp_fp32_bytes": ddp,
        "peers": args.peers,
        "steps": args.steps,
        "codec": args.codec,
        "params": num_params,
        "missed": f"{args.miss.start}:{len(args.miss)}" if args.miss else None,
        "frontier": frontier,
        "baseline_curve": base_curve,
        "baseline_seconds": round(base_s, 1),
    }


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="shoal bench diloco")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--local-steps", type=int, default=75)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--codec", default="int4")
    p.add_argument("--rank", type=int, default=0, help="low-rank averaging (0 = whole tensors)")
    p.add_argument(
        "--topk",
        type=float,
        default=0.0,
        help="send this fraction of each pseudo-gradient (top-k, error feedback; 0 = all); "
        "the wire codec is then sparse",
    )
    p.add_argument("--outer-lr", type=float, default=1.5)
    p.add_argument("--outer-momentum", type=float, default=0.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument(
        "--max-group-size",
        type=int,
        default=64,
        help="largest all-reduce group (below --peers: rounds go on across groups)",
    )
    p.add_argument("--eval-every", type=int, default=1, help="rounds between validations")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=256,
        help="validation batches per evaluation (default: the whole embedded split)",
    )
    p.add_argument("--timeout-s", type=float, default=1500.0)
    p.add_argument("--keep-logs", action="store_true", help="print the peers' logs to stderr")
    p.add_argument("--json", action="store_true", help="accepted; the result is always JSON")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="replicas as threads with an exact exchange (no network); see --settings",
    )
    p.add_argument(
        "--settings",
        default=None,
        help="with --in-process: comma-separated H:outer_lr:outer_momentum[:topk] points "
        "(default: --local-steps:--outer-lr:--outer-momentum:--topk)",
    )
    p.add_argument(
        "--miss",
        type=_missed_rounds,
        default=range(0),
        metavar="ROUND:COUNT",
        help="with --in-process: the last replica misses COUNT rounds from ROUND on (its "
        "rounds fail; it then adopts replica 0's outer state, as a stale peer resyncs)",
    )
    args = p.parse_args(argv)
    if args.miss and not args.in_process:
        p.error("--miss needs --in-process")
    if args.miss and args.peers < 2:
        p.error("--miss needs --peers 2 or more (the last replica misses, replica 0 goes on)")
    if args.topk and not args.in_process:  # in process, each setting picks its codec
        args.codec = WIRE_CODEC  # what top-k vectors travel in
    torch.set_num_threads(1)
    if args.in_process:
        return _in_process(args)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-diloco-") as tmp:
        root = Path(tmp)
        peers: list[PeerProcess] = []
        logs: list[Any] = []
        try:
            logs = [open(root / f"p{i}.log", "w") for i in range(args.peers)]  # noqa: SIM115
            first = PeerProcess(_peer_argv(args, root / "p0", 0, None), "peer0", logs[0])
            peers.append(first)
            address = first.wait_listening(120.0)
            for i in range(1, args.peers):
                argv = _peer_argv(args, root / f"p{i}", i, address)
                peers.append(PeerProcess(argv, f"peer{i}", logs[i]))
            deadline = time.monotonic() + args.timeout_s  # one budget for all, not each
            results = [peer.wait(max(1.0, deadline - time.monotonic())) for peer in peers]
        finally:
            for peer in peers:
                peer.kill()
            for f in logs:
                f.close()
            if args.keep_logs:
                for i in range(args.peers):
                    _log(f"peer{i} log:\n" + (root / f"p{i}.log").read_text()[-3000:])
        swarm_s = time.monotonic() - t0
        baseline, base_curve = _baseline(args, root / "baseline")
    vals = [r["val_bpb"] for r in results]
    val_bpb = sum(vals) / len(vals)
    bytes_sent = sum(int(r["bytes_sent"]) for r in results)
    n = args.peers
    num_params = _train_config(args, 1, Path(".")).model.build().num_params()
    ddp = _ddp_fp32_bytes(args, num_params)
    applied = [sum(1 for e in p.events if e.get("event") == "round" and e["ok"]) for p in peers]
    expected = args.steps // args.local_steps
    evals = [e for e in peers[0].events if e.get("event") == "eval"]
    return {
        "bench": "diloco",
        "val_bpb": round(val_bpb, 4),
        "baseline_val_bpb": round(baseline, 4),
        "loss_gap": round((val_bpb - baseline) / baseline, 4),
        "bytes_sent": bytes_sent,
        "ddp_fp32_bytes": ddp,
        "comm_reduction": round(ddp / max(1, bytes_sent), 1),
        "peers": n,
        "steps": args.steps,
        "local_steps": args.local_steps,
        "codec": args.codec,
        "rank": args.rank,
        "topk": args.topk,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "params": num_params,
        "rounds_ok": min(applied),
        "rounds": expected,
        "ok": all(n == expected for n in applied),
        "peer_val_bpb": vals,
        "curve": [{"step": e["step"], "val_bpb": e["val_bpb"]} for e in evals],
        "baseline_curve": base_curve,
        "swarm_seconds": round(swarm_s, 1),
        "bytes_by_service": _sum_services(results),
    }
