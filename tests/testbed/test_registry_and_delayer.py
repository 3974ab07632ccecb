"""Stale-run detection (pure) and the TUN delayer loop over a packet socketpair."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from shoal.errors import ConfigError
from shoal.testbed.delayer import DelayPlan, run
from shoal.testbed.registry import PREFIX_PATTERN, Record, find_stale, new_prefix


def test_new_prefixes_are_unique_and_match_the_pattern() -> None:
    prefixes = {new_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    assert all(PREFIX_PATTERN.match(p + "relay") for p in prefixes)
    assert all(len(p) == 8 for p in prefixes)


def test_find_stale_keeps_live_and_persistent_owners() -> None:
    starts = {10: 111, 11: 222}  # pid -> start time of running processes
    records = {
        "sh00001-": Record(prefix="sh00001-", pid=10, start_time=111),  # alive
        "sh00002-": Record(prefix="sh00002-", pid=11, start_time=999),  # pid reused
        "sh00003-": Record(prefix="sh00003-", pid=12, start_time=5, persistent=True),
        "sh00004-": None,  # no record
    }
    names = ["sh00001-a", "sh00002-a", "sh00002-b", "sh00003-a", "sh00004-x", "other", "shXYZ-a"]
    stale = find_stale(names, records, starts.get)
    assert stale == {"sh00002-": ["sh00002-a", "sh00002-b"], "sh00004-": ["sh00004-x"]}


def test_delay_plan_picks_per_destination_delay() -> None:
    plan = DelayPlan(0.01, {"198.18.0.7": 0.05})
    header = bytes([0x45]) + bytes(11) + socket.inet_aton("198.18.0.1")
    assert plan.delay_for(header + socket.inet_aton("198.18.0.7")) == 0.05
    assert plan.delay_for(header + socket.inet_aton("198.18.0.8")) == 0.01
    assert plan.delay_for(b"\x60" + bytes(39)) == 0.01  # IPv6: default
    with pytest.raises(ConfigError):
        DelayPlan(-1, {})


def test_delayer_holds_each_packet_for_its_delay_and_keeps_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    header = bytes([0x45]) + bytes(11) + socket.inet_aton("198.18.0.1")
    slow, fast = socket.inet_aton("198.18.0.9"), socket.inet_aton("198.18.0.8")
    plan = DelayPlan(0.0, {"198.18.0.9": 0.08, "198.18.0.8": 0.02})
    received: list[tuple[float, bytes]] = []
    stop = threading.Event()
    counts: list[tuple[int, int]] = []
    worker = threading.Thread(
        target=lambda: counts.append(run(theirs.fileno(), plan, should_stop=stop.is_set))
    )
    worker.start()
    try:
        ours.settimeout(2)
        sent_at = time.monotonic()
        packets = [header + slow + b"1", header + fast + b"2", header + slow + b"3"]
        for packet in packets:
            ours.send(packet)
        for _ in packets:
            data = ours.recv(100)
            received.append((time.monotonic() - sent_at, data[-1:]))
    finally:
        stop.set()
        worker.join(2)
    assert [tag for _, tag in received] == [b"2", b"1", b"3"]
    assert 0.02 <= received[0][0] < 0.07
    assert 0.08 <= received[1][0] < 0.13
    assert counts == [(3, 0)]
