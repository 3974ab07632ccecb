"""Ports for child processes: free now, and outside the range the kernel hands out."""

from __future__ import annotations

import socket
from pathlib import Path

from shoal.testbed.procs import spare_port


def test_a_spare_port_is_free_and_not_one_the_kernel_hands_to_connections():
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {spare_port() for _ in range(20)}
    assert all(not low <= p <= high for p in ports)  # a bind to port 0 is always inside
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert low <= s.getsockname()[1] <= high
    for port in ports:  # and still free
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
