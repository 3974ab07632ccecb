"""Userspace packet delayer on a TUN device: latency for namespaces without netem.

The testbed routes a host's outgoing packets (to other sites) into a TUN device; this
process reads each IPv4 packet, holds it for the delay that belongs to its destination
address, and writes it back into the same TUN device, from where the kernel forwards it out
of the real interface (policy rule ``iif <tun> lookup <real table>``). Packets keep their
addresses and ports, so NAT mappings and TCP simultaneous open behave as on a real link;
any IP protocol works. Delays are applied at the sender only: the testbed gives each
destination the sum of both sites' one-way delays.

Run inside a namespace (``ip netns exec NS``)::

    python -m shoal.testbed.delayer --tun IFNAME --delay-ms 20 --to 198.18.0.3=45

prints ``ready`` once attached and runs until killed. The queue is bounded
(``--max-packets``); beyond it packets are dropped like at a full router queue.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

from shoal.errors import ConfigError

__all__ = ["DelayPlan", "attach_tun", "main", "run"]

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MAX_PACKET = 65536
_READS_PER_WAKE = 256


class DelayPlan:
    """Destination address -> delay in seconds (pure)."""

    def __init__(self, default_s: float, per_dst_s: dict[str, float]) -> None:
        for key, value in [("default", default_s), *per_dst_s.items()]:
            if not 0 <= value <= 10:
                raise ConfigError(f"delay for {key} must be in [0, 10] s, got {value!r}")
        self.default_s = default_s
        self._by_dst = {socket.inet_aton(ip): d for ip, d in per_dst_s.items()}

    def delay_for(self, packet: bytes) -> float:
        """Delay for one raw IPv4 packet (non-IPv4 and runts get the default)."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return self.default_s
        return self._by_dst.get(packet[16:20], self.default_s)


def attach_tun(name: str) -> int:
    """Open ``/dev/net/tun`` and attach to (or create) TUN device ``name``; non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def run(
    fd: int,
    plan: DelayPlan,
    *,
    max_packets: int = 20_000,
    clock: Callable[[], float] = time.monotonic,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[int, int]:
    """Delay every packet read from ``fd`` and write it back, until ``should_stop()``.

    One FIFO per distinct delay keeps each FIFO sorted by release time.

    Returns:
        (packets forwarded, packets dropped).
    """
    queues: dict[float, collections.deque[tuple[float, bytes]]] = {}
    queued = forwarded = dropped = 0
    while not should_stop():
        now = clock()
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else 0.5
        readable, _, _ = select.select([fd], [], [], min(timeout, 0.5))
        now = clock()
        if readable:
            for _ in range(_READS_PER_WAKE):
                try:
                    packet = os.read(fd, _MAX_PACKET)
                except BlockingIOError:
                    break
                if queued >= max_packets:
                    dropped += 1  # tail drop
                    continue
                delay = plan.delay_for(packet)
                queues.setdefault(delay, collections.deque()).append((now + delay, packet))
                queued += 1
        for q in queues.values():
            while q and q[0][0] <= now:
                _, packet = q.popleft()
                queued -= 1
                try:
                    os.write(fd, packet)
                    forwarded += 1
                except OSError:  # e.g. no route any more: lost, as on a wire
                    dropped += 1
    return forwarded, dropped


def _parse(argv: list[str]) -> tuple[str, DelayPlan, int]:
    parser = argparse.ArgumentParser(prog="python -m shoal.testbed.delayer")
    parser.add_argument("--tun", required=True, help="TUN device name to attach to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay for other destinations")
    parser.add_argument("--to", action="append", default=[], help="IP=MS delay for one destination")
    parser.add_argument("--max-packets", type=int, default=20_000, help="queue bound")
    args = parser.parse_args(argv)
    per_dst: dict[str, float] = {}
    for item in args.to:
        ip, sep, ms = item.partition("=")
        try:
            socket.inet_aton(ip)
            per_dst[ip] = float(ms) / 1000
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--to must be IP=MS, got {item!r}") from exc
        if not sep:
            raise ConfigError(f"--to must be IP=MS, got {item!r}")
    if args.max_packets < 1:
        raise ConfigError(f"--max-packets must be >= 1, got {args.max_packets}")
    return args.tun, DelayPlan(args.delay_ms / 1000, per_dst), args.max_packets


def main(argv: list[str] | None = None) -> int:
    try:
        tun, plan, max_packets = _parse(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"delayer: error: {exc}", file=sys.stderr)
        return 2
    fd = attach_tun(tun)
    print("ready", flush=True)
    try:
        run(fd, plan, max_packets=max_packets)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
