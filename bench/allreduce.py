"""`shoal bench allreduce`: seconds per all-reduce round, Shoal vs torch.distributed gloo.

Both run ``--peers`` real processes on 127.0.0.1 averaging ``--params`` fp32 values, in the
same run, one torch thread per process: Shoal's butterfly all-reduce over its gRPC
``Averaging`` service (no compression unless ``--codec``), and gloo's ``all_reduce``
(TCP store on 127.0.0.1). Rounds of the two alternate, so load from elsewhere on the
machine hits both alike. A round's time is the slowest process's time from the moment it
is told to start; the result is the median over ``--rounds`` rounds after one warm-up.

    shoal bench allreduce --peers 4 --params 25000000 --json
    {"bench": "allreduce", "shoal_s": ..., "gloo_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log(msg: str) -> None:
    print(f"[allreduce] {msg}", file=sys.stderr, flush=True)


def _gloo_worker(rank: int, world: int, port: int, numel: int) -> None:
    """One gloo rank: all-reduce (mean) a fresh copy of its input per stdin line."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    data = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    work = data.clone()
    print(json.dumps({"ready": rank}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        work.copy_(data)
        t0, cpu0 = time.perf_counter(), time.process_time()
        dist.all_reduce(work)
        work /= world
        print(
            json.dumps({"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}),
            flush=True,
        )
    dist.destroy_process_group()


class _Gloo:
    """``peers`` gloo ranks on 127.0.0.1, one round per ``round()`` call."""

    def __init__(self, peers: int, numel: int) -> None:
        port = _free_port()
        self.procs: list[subprocess.Popen[str]] = []
        self._lines: list[queue.Queue[dict | None]] = []
        try:
            for r in range(peers):
                argv = [sys.executable, __file__, "--gloo-worker", str(r), str(peers), str(port)]
                proc = subprocess.Popen(
                    [*argv, str(numel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                lines: queue.Queue[dict | None] = queue.Queue()
                threading.Thread(target=self._pump, args=(proc, lines), daemon=True).start()
                self.procs.append(proc)
                self._lines.append(lines)
            for i in range(peers):
                self._read(i, 120.0)
        except BaseException:
            self.close()  # no rank outlives a failed start
            raise

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[dict | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                lines.put(json.loads(line))
        lines.put(None)

    def _read(self, rank: int, timeout_s: float) -> dict:
        try:
            reply = self._lines[rank].get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"gloo rank {rank} gave no answer within {timeout_s} s") from None
        if reply is None:
            raise RuntimeError(f"gloo rank {rank} exited with {self.procs[rank].wait()}")
        return reply

    def round(self) -> tuple[float, float]:
        """(seconds of the slowest rank, CPU seconds of all ranks together)."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        replies = [self._read(i, 120.0) for i in range(len(self.procs))]
        return max(r["seconds"] for r in replies), sum(r["cpu_s"] for r in replies)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    p.stdin.write("quit\n")
                    p.stdin.close()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class _Shoal:
    """``peers`` Shoal peer processes; one all-reduce round per ``round()`` call."""

    def __init__(self, peers: int, numel: int, codec: str, event_loop: str) -> None:
        from shoal.parallel.data.loopback import LoopbackSwarm

        self.swarm = LoopbackSwarm(peers, event_loop=event_loop)
        try:
            self.swarm.configure(numel, seed=0, codec=codec)
        except BaseException:
            self.swarm.close()
            raise
        self.k = 0
        self.phases: list[dict] = []

    def round(self) -> tuple[float, float]:
        """(seconds of the slowest peer, CPU seconds of all peers together)."""
        n = len(self.swarm.procs)
        self.swarm.start_round(self.k, timeout_s=60.0)
        replies = [self.swarm.read(i, 120.0) for i in range(n)]
        self.k += 1
        if not all(r["ok"] for r in replies):
            raise RuntimeError(f"round failed: {[r['reason'] for r in replies]}")
        # A round that left a late peer out would be faster than gloo's, which waits for all.
        if any(len(r["contributors"]) != n for r in replies):
            raise RuntimeError(f"round left peers out: {[r['contributors'] for r in replies]}")
        slowest = max(replies, key=lambda r: r["seconds"])
        self.phases.append({k: round(v, 3) for k, v in slowest["phases"].items()})
        return slowest["seconds"], sum(r["cpu_s"] for r in replies)

    def close(self) -> None:
        self.swarm.close()


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="shoal bench allreduce")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--codec", default="none", choices=["none", "fp16", "int8"])
    parser.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],  # shoal.net.eventloop.EVENT_LOOPS
        help="the peers' network loop (NetConfig.event_loop)",
    )
    parser.add_argument("--json", action="store_true", help="(always on) print one JSON line")
    args = parser.parse_args(argv)
    if args.peers < 2 or args.params < args.peers or args.rounds < 1:
        raise SystemExit("need --peers >= 2, --params >= --peers, --rounds >= 1")
    _log(f"{args.peers} peers, {args.params} fp32 params, {args.rounds} rounds")
    shoal = _Shoal(args.peers, args.params, args.codec, args.event_loop)
    try:
        gloo = _Gloo(args.peers, args.params)
        try:
            # Alternate the two so that load from elsewhere hits both alike, and which goes
            # first (ABBA: neither always runs in the other's wake); round 0 warms up.
            shoal_times, gloo_times, shoal_cpu, gloo_cpu = [], [], [], []
            for k in range(args.rounds + 1):
                if k % 2:
                    (g_t, g_cpu), (s_t, s_cpu) = gloo.round(), shoal.round()
                else:
                    (s_t, s_cpu), (g_t, g_cpu) = shoal.round(), gloo.round()
                if k:
                    shoal_times.append(s_t)
                    gloo_times.append(g_t)
                    shoal_cpu.append(s_cpu)
                    gloo_cpu.append(g_cpu)
        finally:
            gloo.close()
    finally:
        shoal.close()
    _log(f"shoal rounds: {[round(t, 3) for t in shoal_times]}")
    _log(f"gloo rounds:  {[round(t, 3) for t in gloo_times]}")
    _log(f"shoal phases (slowest peer): {shoal.phases[1:]}")
    _log(f"CPU s per round, all processes: shoal {shoal_cpu}, gloo {gloo_cpu}")
    shoal_s, gloo_s = statistics.median(shoal_times), statistics.median(gloo_times)
    return {
        "bench": "allreduce",
        "shoal_s": round(shoal_s, 4),
        "gloo_s": round(gloo_s, 4),
        "ratio": round(shoal_s / gloo_s, 2),
        "shoal_cpu_s": round(statistics.median(shoal_cpu), 3),
        "gloo_cpu_s": round(statistics.median(gloo_cpu), 3),
        "peers": args.peers,
        "params": args.params,
        "rounds": args.rounds,
        "codec": args.codec,  # gloo always averages fp32
        "event_loop": ",".join(sorted(set(shoal.swarm.loops))),  # as the peers said
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--gloo-worker":
        _gloo_worker(*(int(a) for a in sys.argv[2:6]))
    else:
        print(json.dumps(main(sys.argv[1:])))
        os._exit(0)
