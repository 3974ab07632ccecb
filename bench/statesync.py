"""State sync benchmark: download a model + AdamW snapshot from 1 and 3 donor processes.

    shoal bench statesync [--params 100000000] [--reps 2] [--ckpt-params 5000000]

Three donor processes (``python -m shoal.state.static_donor --raw``) hold the same synthetic
snapshot: ``params`` float32 parameters plus two AdamW moments (3 x 4 x params bytes). This
process is the joiner. Per repetition, on the same network loop and in alternating order:

* ``raw``: a bare grpc.aio stream of the same bytes from donor 0 (no auth, no checksums),
  copied into one preallocated buffer: the baseline;
* ``s_1_donor``: ``download`` from donor 0 only (manifest, ranged Fetch, per-chunk xxHash3,
  writes into preallocated tensors; two streams, the default);
* ``s_1_donor_1_stream``: the same with one Fetch stream (like for like with ``raw``);
* ``s_3_donors``: the same from all three donors in parallel.

Both paths are warmed once, untimed; each figure is the best of ``--reps``
(``ratio_vs_raw_median`` uses medians instead). ``ratio_vs_raw`` = raw / s_1_donor (1.0 = as fast
as the bare stream). Also measured: the compute-thread pause of a background checkpoint
(CPU copy only) against a synchronous save (copy + serialize + sha256 + fsync + rename) of
a ``--ckpt-params`` model with AdamW state.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.config import MiB
from shoal.net.identity import PeerID
from shoal.state.announce import Announcement, DonorChoice
from shoal.state.background import BackgroundCheckpointer, CheckpointerConfig
from shoal.state.checkpoint import Snapshot, write_snapshot
from shoal.state.static_donor import RAW_METHOD, synthetic_snapshot
from shoal.state.sync_client import SyncConfig, download


def _log(msg: str) -> None:
    print(f"[statesync] {msg}", file=sys.stderr, flush=True)


class _RawClient:
    """A bare grpc.aio channel to a donor's raw stream, opened once and reused (on the loop)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channel: grpc.aio.Channel | None = None
        # Allocated once and reused, as the State client fills tensors allocated once: a fresh
        # 1.2 GB buffer per repetition would charge the baseline for page faults, not the wire.
        self.buf: bytearray | None = None

    async def fetch(self, total: int) -> int:
        if self.channel is None:
            options = [("grpc.max_receive_message_length", 4 * MiB)]
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=options)
        call = self.channel.unary_stream(RAW_METHOD, request_serializer=None)
        if self.buf is None or len(self.buf) != total:
            self.buf = bytearray(total)
        view = memoryview(self.buf)
        pos = 0
        async for chunk in call(b"", timeout=600):
            n = len(chunk)
            if pos + n > total:
                raise RuntimeError("raw stream longer than announced")
            view[pos : pos + n] = chunk
            pos += n
        return pos

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def _start_donors(n: int, params: int) -> tuple[list[subprocess.Popen[str]], list[dict[str, Any]]]:
    cmd = [sys.executable, "-m", "shoal.state.static_donor", "--params", str(params), "--raw"]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    infos = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the donor prints "ready" or exits
        if not line:
            raise RuntimeError("a donor process exited before it was ready")
        infos.append(json.loads(line))
    return procs, infos


def _checkpoint_pause(params: int, reps: int) -> tuple[float, float]:
    snap = synthetic_snapshot(params, 1)
    live = {stem: {k: v.clone() for k, v in t.items()} for stem, t in snap.files.items()}

    def copy() -> Snapshot:
        files = {stem: {k: v.clone() for k, v in t.items()} for stem, t in live.items()}
        return Snapshot(step=1, files=files)

    pauses, syncs = [], []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-ckpt-") as tmp:
        ckpt = BackgroundCheckpointer(Path(tmp) / "bg", CheckpointerConfig(keep_last=1))
        for step in range(reps):
            pauses.append(ckpt.save(step, copy))
            ckpt.flush(300)
            start = time.perf_counter()
            write_snapshot(copy(), Path(tmp) / "sync", keep_last=1)
            syncs.append(time.perf_counter() - start)
        ckpt.close()
    return statistics.median(pauses), statistics.median(syncs)


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="shoal bench statesync")
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ckpt-params", type=int, default=5_000_000)
    parser.add_argument("--json", action="store_true", help="accepted; output is always JSON")
    args = parser.parse_args(argv)

    pause_s, sync_save_s = _checkpoint_pause(args.ckpt_params, 3)
    _log(f"checkpoint pause {pause_s:.4f} s vs synchronous save {sync_save_s:.4f} s")

    _log(f"starting 3 donors with {args.params} params (+ AdamW state) each")
    procs, infos = _start_donors(3, args.params)
    runtime = NetRuntime(Identity.generate(), NetConfig(port=0)).start()
    try:
        version, total, step = infos[0]["version"], infos[0]["total_bytes"], infos[0]["step"]
        if any(i["version"] != version for i in infos):
            raise RuntimeError("donors disagree on the snapshot version")
        anns = [
            Announcement(PeerID.from_string(i["peer_id"]), step, version, i["address"], total)
            for i in infos
        ]
        config = SyncConfig(total_timeout_s=900, piece_timeout_s=300)
        one = DonorChoice(step, version, anns[:1], [])
        three = DonorChoice(step, version, anns, [])
        raw_client = _RawClient(infos[0]["raw_port"])
        # warm both paths once (connection, handshake, flow-control windows), untimed
        runtime.run(raw_client.fetch(total), timeout_s=900)
        runtime.run(download(runtime, one, config), timeout_s=900)
        single = SyncConfig(total_timeout_s=900, piece_timeout_s=300, streams_per_donor=1)
        times: dict[str, list[float]] = {"raw": [], "one": [], "one_1s": [], "three": []}
        for rep in range(args.reps):
            order = ["raw", "one", "one_1s", "three"]
            order = order if rep % 2 == 0 else order[::-1]
            for kind in order:
                gc.collect()
                start = time.perf_counter()
                if kind == "raw":
                    got = runtime.run(raw_client.fetch(total), timeout_s=900)
                    if got != total:
                        raise RuntimeError(f"raw stream gave {got} of {total} bytes")
                else:
                    choice = three if kind == "three" else one
                    cfg = single if kind == "one_1s" else config
                    result = runtime.run(download(runtime, choice, cfg), timeout_s=900)
                    if result.manifest.version != version or result.failed_donors:
                        raise RuntimeError(f"sync went wrong: {result.failed_donors}")
                    del result
                times[kind].append(time.perf_counter() - start)
                _log(f"rep {rep} {kind}: {times[kind][-1]:.3f} s ({total / MiB:.0f} MiB)")
        runtime.run(raw_client.close(), timeout_s=5)
    finally:
        runtime.close()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    raw, s1, s1s, s3 = (min(times[k]) for k in ("raw", "one", "one_1s", "three"))
    return {
        "bench": "statesync",
        "params": args.params,
        "bytes": total,
        "raw_s": round(raw, 4),
        "s_1_donor": round(s1, 4),
        "s_3_donors": round(s3, 4),
        "s_1_donor_1_stream": round(s1s, 4),
        "ratio_vs_raw": round(raw / s1, 3),
        "ratio_vs_raw_median": round(
            statistics.median(times["raw"]) / statistics.median(times["one"]), 3
        ),
        "speedup_3_vs_1": round(s1 / s3, 3),
        "raw_MBps": round(total / raw / 1e6, 1),
        "ckpt_params": args.ckpt_params,
        "ckpt_pause_s": round(pause_s, 4),
        "ckpt_sync_save_s": round(sync_save_s, 4),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
