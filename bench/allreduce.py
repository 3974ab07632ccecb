"""`shoal bench allreduce`: seconds per all-reduce round, Shoal vs torch.distributed gloo.

Both run ``--peers`` real processes on 127.0.0.1 averaging ``--params`` fp32 values, in the
same run, one torch thread per process: Shoal's butterfly all-reduce over its gRPC
``Averaging`` service (no compression unless ``--codec``), and gloo's ``all_reduce``
(TCP store on 127.0.0.1). A round's time is the slowest process's time; the result is
the median over ``--rounds`` rounds after one warm-up round.

    shoal bench allreduce --peers 4 --params 25000000 --json
    {"bench": "allreduce", "shoal_s": ..., "gloo_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log(msg: str) -> None:
    print(f"[allreduce] {msg}", file=sys.stderr, flush=True)


def _gloo_worker(rank: int, world: int, port: int, numel: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    data = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(rounds + 1):
        tensor = data.clone()
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        tensor /= world
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times[1:], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"times": slowest.tolist()}), flush=True)
    dist.destroy_process_group()


def run_gloo(peers: int, numel: int, rounds: int) -> float:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--gloo-worker",
                str(r),
                str(peers),
                str(port),
                str(numel),
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(peers)
    ]
    out = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"gloo workers failed: {[p.returncode for p in procs]}")
    times = json.loads(out[0].strip().splitlines()[-1])["times"]
    _log(f"gloo rounds: {[round(t, 3) for t in times]}")
    return statistics.median(times)


def run_shoal(peers: int, numel: int, rounds: int, codec: str) -> tuple[float, dict]:
    from shoal.parallel.data.loopback import LoopbackSwarm

    swarm = LoopbackSwarm(peers)
    try:
        swarm.configure(numel, seed=0, codec=codec)
        times, phases = [], []
        for k in range(rounds + 1):
            swarm.start_round(k, timeout_s=60.0)
            replies = [swarm.read(i, 120.0) for i in range(peers)]
            if not all(r["ok"] for r in replies):
                raise RuntimeError(f"round {k} failed: {[r['reason'] for r in replies]}")
            if k:
                times.append(max(r["seconds"] for r in replies))
                phases.append(max(replies, key=lambda r: r["seconds"])["phases"])
        _log(f"shoal rounds: {[round(t, 3) for t in times]}")
        _log(f"shoal phases of the slowest peer: {phases}")
        return statistics.median(times), phases[len(phases) // 2]
    finally:
        swarm.close()


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="shoal bench allreduce")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--codec", default="none", choices=["none", "fp16", "int8"])
    parser.add_argument("--json", action="store_true", help="(always on) print one JSON line")
    args = parser.parse_args(argv)
    if args.peers < 2 or args.params < args.peers or args.rounds < 1:
        raise SystemExit("need --peers >= 2, --params >= --peers, --rounds >= 1")
    _log(f"{args.peers} peers, {args.params} fp32 params, {args.rounds} rounds")
    shoal_s, _ = run_shoal(args.peers, args.params, args.rounds, args.codec)
    gloo_s = run_gloo(args.peers, args.params, args.rounds)
    return {
        "bench": "allreduce",
        "shoal_s": round(shoal_s, 4),
        "gloo_s": round(gloo_s, 4),
        "ratio": round(shoal_s / gloo_s, 2),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--gloo-worker":
        _gloo_worker(*(int(a) for a in sys.argv[2:7]))
    else:
        print(json.dumps(main(sys.argv[1:])))
        os._exit(0)
