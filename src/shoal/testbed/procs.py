"""Process liveness, for code that takes down processes it started and checks none is
left, and ports for processes it starts to listen on."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

__all__ = ["pid_alive", "spare_port"]

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def spare_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host`` for a child process to listen on a moment later.

    Chosen outside the kernel's ephemeral range: a port the kernel hands out (a bind to
    port 0) is in that range, and between this check and the child's bind the kernel can
    hand the same port to any outgoing connection on the machine; the child then failed
    with "address already in use" (seen when test runs overlapped). Falls back to the
    kernel's choice after 64 taken ports.
    """
    try:
        low, high = (int(v) for v in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    span = (10000, low - 1) if low - 1 - 10000 >= 1000 else (high + 1, 65535)
    rng = random.Random()
    for port in [*(rng.randint(*span) for _ in range(64)), 0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no port to listen on at {host}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``; ``kill 0`` elsewhere).

    A zombie counts as gone: it runs nothing and holds no socket, and a process we did not
    start stays one until its own parent reaps it.
    """
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
