"""TCP hole punching by simultaneous open, given the peer's public ``ip:port``.

Both peers learn each other's public address from a rendezvous (a relay or any public
peer they both reach), each from a connection whose local port it keeps. Then both connect,
at about the same time, *from that same local port* to the other's public address. Each
outgoing SYN opens a mapping in the sender's NAT; once both mappings exist, a SYN crossing
them meets a socket in ``SYN_SENT`` and the kernel completes a simultaneous open. NATs that
drop unsolicited SYNs silently let the retransmitted SYN through; a NAT that answers with RST
or maps each destination to a new port (symmetric) defeats it, and traffic stays relayed.

Each attempt is one connect that stays open for ``attempt_timeout_s`` (so the kernel's SYN
retransmissions have time to cross); attempts are bounded in number and by
``total_timeout_s``. Sockets are bound with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` so the
rendezvous connection (bound with ``reusable_socket``) can stay open on the same port.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from shoal.errors import ConfigError, PeerTimeout, PeerUnavailable
from shoal.net.aio import within

__all__ = ["PunchConfig", "PunchResult", "punch", "reusable_socket"]


@dataclass(kw_only=True, slots=True)
class PunchConfig:
    """Bounds of one hole-punching try."""

    attempts: int = 3
    """Connect attempts at most."""
    attempt_timeout_s: float = 4.0
    """How long one connect stays open (covers the first SYN retransmissions: 1 s, 3 s)."""
    retry_gap_s: float = 0.2
    """Pause after an attempt that failed fast (e.g. refused), before the next one."""
    total_timeout_s: float = 15.0
    """Deadline for the whole try, attempts and pauses included."""

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 100:
            raise ConfigError(f"attempts must be in [1, 100], got {self.attempts!r}")
        for name in ("attempt_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.retry_gap_s >= 0:
            raise ConfigError(f"retry_gap_s must be >= 0, got {self.retry_gap_s!r}")


@dataclass(kw_only=True, slots=True)
class PunchResult:
    """A connected socket (non-blocking, ``TCP_NODELAY``) and how it was obtained."""

    sock: socket.socket
    attempts: int
    local: tuple[str, int]
    peer: tuple[str, int]


def reusable_socket(host: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """A non-blocking TCP socket bound to ``host:port`` with address and port reuse.

    Use it for the rendezvous connection too, so the punch can reuse its local port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def punch(
    local_port: int,
    peer: tuple[str, int],
    config: PunchConfig | None = None,
    *,
    local_host: str = "0.0.0.0",
) -> PunchResult:
    """Connect from ``local_host:local_port`` to ``peer`` while the peer does the same.

    Raises:
        PeerTimeout: ``total_timeout_s`` passed without a connection.
        PeerUnavailable: every attempt failed (timed out, refused or unreachable).
    """
    cfg = config or PunchConfig()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.total_timeout_s
    last_error: BaseException | None = None
    peer_text = f"{peer[0]}:{peer[1]}"
    for attempt in range(1, cfg.attempts + 1):
        left = deadline - loop.time()
        if left <= 0:
            raise PeerTimeout(f"hole punch gave up after {attempt - 1} attempts", peer=peer_text)
        sock = reusable_socket(local_host, local_port)
        started = loop.time()
        try:
            await within(loop.sock_connect(sock, peer), min(cfg.attempt_timeout_s, left))
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last_error = exc
            fast_failure = loop.time() - started < cfg.attempt_timeout_s / 2
            if fast_failure and attempt < cfg.attempts:
                await asyncio.sleep(min(cfg.retry_gap_s, max(0.0, deadline - loop.time())))
            continue
        local = sock.getsockname()
        return PunchResult(sock=sock, attempts=attempt, local=(local[0], local[1]), peer=peer)
    reason = type(last_error).__name__ if last_error is not None else "no attempt"
    raise PeerUnavailable(
        f"hole punch failed after {cfg.attempts} attempts ({reason})", peer=peer_text
    ) from last_error
