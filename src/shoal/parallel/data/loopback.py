"""A swarm of real averaging peers, one OS process each (bench and fault tests).

``python -m shoal.parallel.data.loopback [--host ADDR]`` is one peer: it starts a
``NetRuntime`` (on 127.0.0.1 unless ``--host``) and the ``Averaging`` service, prints
``{"peer": hex, "address": ...}`` and then obeys JSON lines on stdin:

- ``{"cmd": "group", "members": [[hex, address], ...], "numel": N, "seed": S, "codec": C,
  "clients": [rank, ...], "uplinks": [bps, ...], "downlinks": [bps, ...]}``: its input
  vector is ``randn(N)`` from generator seed ``S + rank`` (weight ``rank + 1``), so a
  parent can recompute every input exactly; ``clients`` are the ranks in client mode
  (never dialed: they pull their results); the links set the shares (default: equal);
- ``{"cmd": "round", "round": k, "timeout_s": T, "out": path|null, "hold_after": j|null}``:
  average a fresh copy of the input; print the result (and save it to ``out``), with the
  transport's link samples of the round (``uplink_bps``, ``downlink_bps``; null without
  one). With
  ``hold_after`` the peer prints ``{"event": "held"}`` after sending ``j`` contributions and
  then stalls forever (a parent kills it there: a peer dying mid reduce-scatter);
- ``{"cmd": "quit"}``.

:class:`LoopbackSwarm` is the parent side: start, configure, run rounds, kill, close. By
default its peers run on 127.0.0.1; ``placements`` put each one elsewhere (a host of a
testbed: its address and the argv prefix that runs a command there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from shoal.net.config import NetConfig
from shoal.net.eventloop import EVENT_LOOPS
from shoal.net.identity import Identity, PeerID
from shoal.net.runtime import NetRuntime
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.grpc_transport import GrpcTransport
from shoal.parallel.data.messages import Contribution, Member, Message

__all__ = ["LoopbackSwarm", "Placement", "peer_input", "peer_weight"]

_print_lock = threading.Lock()


def _emit(obj: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def peer_input(numel: int, seed: int, rank: int) -> torch.Tensor:
    """The input vector of the peer of ``rank`` (recomputable by the parent)."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed + rank))


def peer_weight(rank: int) -> float:
    return float(rank + 1)


class _Holding:
    """Wraps a transport; stalls forever after ``hold_after`` contributions were sent."""

    def __init__(self, inner: GrpcTransport, hold_after: int) -> None:
        self.inner, self.me, self.inbox = inner, inner.me, inner.inbox
        self.hold_after, self.sent = hold_after, 0
        self.begin, self.end = inner.begin, inner.end

    async def send(self, to: Member, message: Message, timeout_s: float) -> None:
        if isinstance(message, Contribution):
            if self.sent >= self.hold_after:
                _emit({"event": "held"})
                await asyncio.Event().wait()
            self.sent += 1
        await self.inner.send(to, message, timeout_s)


def _hex(peer: Member) -> str:
    return peer.raw.hex() if isinstance(peer, PeerID) else repr(peer)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one peer process runs: the address it listens on, and the argv prefix that
    starts a command there (e.g. ``ip netns exec NS``)."""

    host: str = "127.0.0.1"
    argv_prefix: tuple[str, ...] = ()


def _peer_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.parallel.data.loopback")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument(
        "--event-loop", default="auto", choices=EVENT_LOOPS, help="NetConfig.event_loop"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = NetConfig(host=args.host, port=0, unix_socket=False, event_loop=args.event_loop)
    runtime = NetRuntime(Identity.generate(), config).start()
    transport = GrpcTransport(runtime)
    loop = "uvloop" if type(runtime.loop).__module__.startswith("uvloop") else "asyncio"
    _emit({"peer": runtime.peer_id.raw.hex(), "address": runtime.address, "loop": loop})
    group: GroupSpec | None = None
    averager: Averager | None = None
    data = work = torch.empty(0)
    rank, codec = 0, "none"
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "group":
                members = [PeerID(bytes.fromhex(h)) for h, _ in cmd["members"]]
                for peer, (_, address) in zip(members, cmd["members"], strict=True):
                    transport.set_address(peer, address)
                rank = members.index(runtime.peer_id)
                data = peer_input(cmd["numel"], cmd["seed"], rank)
                work = data.clone()
                codec = cmd.get("codec", "none")
                averager = None
                clients = set(cmd.get("clients", ()))
                n = len(members)
                group = GroupSpec(
                    b"",
                    tuple(members),
                    tuple(float(b) for b in cmd.get("uplinks") or (1.0,) * n),
                    tuple(i in clients for i in range(n)),
                    tuple(float(b) for b in cmd.get("downlinks") or ()),
                )
                _emit({"configured": rank})
            elif cmd["cmd"] == "round" and group is not None:
                spec = replace(group, round_id=f"round-{cmd['round']}".encode())
                hold = cmd.get("hold_after")
                if hold is not None:
                    averager = Averager(_Holding(transport, hold), wire_codec=codec)
                elif averager is None or averager.transport is not transport:
                    averager = Averager(transport, wire_codec=codec)  # kept, like a trainer's
                work.copy_(data)
                t0, cpu0 = time.perf_counter(), time.process_time()
                result = runtime.run(
                    averager.average(
                        [work], peer_weight(rank), group=spec, timeout_s=cmd["timeout_s"]
                    ),
                    cmd["timeout_s"] + 5.0,
                )
                seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
                if cmd.get("out") and result.ok:
                    torch.save(work, cmd["out"])
                _emit(
                    {
                        "round": cmd["round"],
                        "ok": result.ok,
                        "reason": result.reason,
                        "contributors": sorted(_hex(p) for p in result.contributors),
                        "seconds": seconds,
                        "cpu_s": cpu_s,
                        "phases": result.seconds,
                        "uplink_bps": transport.uplink_sample(),
                        "downlink_bps": transport.downlink_sample(),
                    }
                )
    finally:
        runtime.close()


class LoopbackSwarm:
    """Parent side: ``n`` peer processes (on loopback unless ``placements`` say where),
    driven over pipes."""

    def __init__(
        self,
        n: int,
        *,
        env: dict[str, str] | None = None,
        placements: Sequence[Placement] | None = None,
        event_loop: str = "auto",
    ) -> None:
        places = list(placements) if placements is not None else [Placement()] * n
        if len(places) != n:
            raise ValueError(f"{len(places)} placements for {n} peers")
        self.procs: list[subprocess.Popen[str]] = []
        self._lines: list[queue.Queue[dict[str, Any]]] = []
        self.peers: list[tuple[str, str]] = []
        self.loops: list[str] = []
        """Each peer's network loop, as it said when it started (uvloop or asyncio)."""
        try:
            for place in places:
                argv = [sys.executable, "-m", "shoal.parallel.data.loopback", "--host", place.host]
                argv += ["--event-loop", event_loop]
                proc = subprocess.Popen(
                    [*place.argv_prefix, *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, **(env or {})},
                )
                lines: queue.Queue[dict[str, Any]] = queue.Queue()
                threading.Thread(target=self._pump, args=(proc, lines), daemon=True).start()
                self.procs.append(proc)
                self._lines.append(lines)
            for i in range(n):
                hello = self.read(i, 60.0)
                self.peers.append((hello["peer"], hello["address"]))
                self.loops.append(str(hello.get("loop", "")))
        except BaseException:
            self.close()  # no peer outlives a failed start
            raise

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                lines.put(json.loads(line))

    def send(self, i: int, cmd: dict[str, Any]) -> None:
        proc = self.procs[i]
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()

    def read(self, i: int, timeout_s: float) -> dict[str, Any]:
        """The next JSON line of peer ``i``; raises TimeoutError."""
        try:
            return self._lines[i].get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"peer {i} said nothing for {timeout_s} s") from None

    def configure(
        self,
        numel: int,
        seed: int,
        codec: str = "none",
        clients: tuple[int, ...] = (),
        links: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        """Tell every peer the group (``clients``: ranks in client mode; ``links``: the
        members' (uplinks, downlinks) the shares follow, equal by default) and its input."""
        members = [list(p) for p in self.peers]
        cmd = {"cmd": "group", "members": members, "numel": numel, "seed": seed, "codec": codec}
        if links is not None:
            cmd["uplinks"], cmd["downlinks"] = list(links[0]), list(links[1])
        for i in range(len(self.procs)):
            self.send(i, {**cmd, "clients": list(clients)})
        for i in range(len(self.procs)):
            self.read(i, 60.0)

    def start_round(
        self, k: int, timeout_s: float, extra: dict[int, dict[str, Any]] | None = None
    ) -> None:
        """Tell every live peer to run round ``k``; ``extra[i]`` adds fields for peer i."""
        for i in range(len(self.procs)):
            cmd: dict[str, Any] = {"cmd": "round", "round": k, "timeout_s": timeout_s}
            cmd.update((extra or {}).get(i, {}))
            self.send(i, cmd)

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10.0)

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    self.send(i, {"cmd": "quit"})
        for proc in self.procs:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)


if __name__ == "__main__":
    _peer_main(sys.argv[1:])
