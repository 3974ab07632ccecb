"""Every network knob of a peer, in one documented place (units in the names).

``NetConfig`` flows down through constructors (runtime -> server, pool, streams); nothing in
``net/`` reads globals or environment variables. ``RetryPolicy`` is the one retry/backoff
shape used for reconnects and idempotent calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.errors import ConfigError
from shoal.net.eventloop import EVENT_LOOPS, uvloop_installed

MiB = 1 << 20


def split_host_port(text: str, *, port_zero: bool = False) -> tuple[str, int] | None:
    """``(host, port)`` from ``host:port`` (an IPv6 host's brackets stripped), or None unless
    the host is non-empty and the port is in 1..65535 (0..65535 with ``port_zero``).

    The host is a name or an address: no ``/``, whitespace or other gRPC target syntax
    (``unix:/path``, ``dns:///name``), and a colon only inside an IPv6 host's brackets.
    """
    host, sep, port = text.rpartition(":")
    # ASCII digits only, at most 5: isdigit() also takes e.g. "²", which int() refuses
    if not (sep and host and port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    bare = host[1:-1] if bracketed else host
    if not bare.isprintable() or any(c in bare for c in "/[]@ ") or (":" in bare) != bracketed:
        return None
    number = int(port)
    if not (0 if port_zero else 1) <= number <= 65535:
        return None
    return host.strip("[]"), number


def is_host_port(text: str) -> bool:
    """``text`` is ``host:port`` with a non-empty host and a port in 1..65535."""
    return split_host_port(text) is not None


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by an overall deadline."""

    initial_s: float = 0.1
    """Delay before the second attempt."""
    max_s: float = 5.0
    """Cap on any single delay."""
    factor: float = 2.0
    """Each delay is the previous one times this."""
    jitter: float = 0.2
    """Each delay is scaled by a uniform factor in [1 - jitter, 1 + jitter]."""
    deadline_s: float = 30.0
    """No attempt starts after this long since the first one."""
    attempts: int = 4
    """Total attempts, the first included (1 = no retry)."""

    def __post_init__(self) -> None:
        _positive(self, "initial_s", "max_s", "deadline_s", "attempts")
        if self.factor < 1.0:
            raise ConfigError(f"RetryPolicy.factor must be >= 1, got {self.factor!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_s < self.initial_s:
            raise ConfigError(
                f"RetryPolicy.max_s ({self.max_s!r}) must be >= initial_s ({self.initial_s!r})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthConfig:
    """Per-peer failure scores and temporary bans (see ``health.py``)."""

    failure_weight: float = 1.0
    """Score added by one failed attempt (each attempt of a retried call counts)."""
    score_half_life_s: float = 60.0
    """A peer's failure score halves every this many seconds."""
    ban_threshold: float = 5.0
    """A peer whose score reaches this is banned."""
    ban_base_s: float = 10.0
    """Length of a first ban; each further ban doubles it."""
    ban_max_s: float = 600.0
    """Cap on a ban's length."""
    ban_memory_s: float = 3600.0
    """A peer with no ban for this long starts again from ``ban_base_s``."""

    def __post_init__(self) -> None:
        _positive(self, "failure_weight", "score_half_life_s", "ban_threshold", "ban_base_s")
        _positive(self, "ban_max_s", "ban_memory_s")


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorLimits:
    """What a tensor stream may declare; checked against the header before allocating."""

    max_bytes: int = 1 << 30
    """Largest payload of one tensor."""
    max_dims: int = 8
    """Most dimensions of one tensor."""
    max_tensors: int = 4096
    """Most tensors in one stream."""
    allowed_dtypes: frozenset[str] = frozenset(
        {
            "float32",
            "float16",
            "bfloat16",
            "float64",
            "int8",
            "uint8",
            "int16",
            "int32",
            "int64",
            "bool",
        }
    )
    """torch dtype names a stream may carry."""

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_dims", "max_tensors")


@dataclass(frozen=True, kw_only=True, slots=True)
class NetConfig:
    """Network settings of one peer."""

    host: str = "127.0.0.1"
    """Address the gRPC server binds on TCP."""
    port: int = 0
    """TCP port; 0 lets the OS choose (``runtime.port`` reports it)."""
    announce: str | None = None
    """``host:port`` other peers are told to dial when it is not the listener's own address
    (a port forward, a proxy or a shaped link in front of this peer); None = the listener."""
    unix_socket: bool = True
    """Also listen on a unix socket (where relayed and punched links are bridged)."""
    unix_socket_dir: str | None = None
    """Folder of the unix socket; None = a fresh temporary folder removed on close."""
    swarm_key: bytes = b""
    """Pre-shared secret of a closed swarm; empty = open swarm."""
    allowlist: frozenset[bytes] | None = None
    """Raw PeerIDs allowed to call (and be called); None = anyone in the swarm."""

    call_timeout_s: float = 10.0
    """Default deadline of a unary call (whole call, connect included)."""
    stream_timeout_s: float = 120.0
    """Default deadline of a streaming call."""
    connect_timeout_s: float = 5.0
    """Deadline of one connect + handshake."""
    max_clock_skew_s: float = 60.0
    """Largest difference between a caller's timestamp and ours that we accept."""
    session_ttl_s: float = 3600.0
    """A session key is used at most this long; the client then handshakes again."""
    max_sessions: int = 4096
    """Sessions the server remembers; the least recently used is dropped beyond."""
    replay_window: int = 1024
    """Calls of one session that may arrive out of order (counter window)."""

    keepalive_s: float = 20.0
    """Interval of HTTP/2 keepalive pings on idle connections."""
    keepalive_timeout_s: float = 10.0
    """A keepalive ping unanswered this long closes the connection."""
    idle_close_s: float = 300.0
    """A pooled connection unused this long is closed."""
    sweep_interval_s: float = 5.0
    """How often idle connections and expired sessions are swept."""
    reconnect: RetryPolicy = field(default_factory=RetryPolicy)
    """Backoff between connection attempts to one address (initial, max, factor, jitter;
    the pool never gives up on an address by itself: failures feed ``health`` bans)."""
    call_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial_s=0.05, max_s=1.0, deadline_s=10.0, attempts=3)
    )
    """Retries of calls marked idempotent (transport failures only)."""
    health: HealthConfig = field(default_factory=HealthConfig)

    max_message_bytes: int = 4 * MiB
    """Largest single gRPC message accepted (bounded before allocation by gRPC)."""
    chunk_bytes: int = MiB
    """Chunk size of tensor streams sent by this peer (at most 1 MiB)."""
    tensor_limits: TensorLimits = field(default_factory=TensorLimits)
    """Default limits of received tensor streams."""
    max_ping_payload_bytes: int = 64 * 1024
    """Largest Ping payload echoed."""
    max_emit_bytes: int = 64 * MiB
    """Largest link probe a caller may ask of ``Peer.Emit``."""
    shutdown_grace_s: float = 0.5
    """In-flight calls get this long to finish when the runtime closes."""
    max_tracked_peers: int = 1024
    """Peers tracked separately by traffic accounting; the rest count as "other"."""
    keep_freed_memory: bool = True
    """Tune the process's allocator (glibc) to reuse freed buffers instead of returning them
    to the kernel: fewer page faults per round, a larger resident heap (``allocator.py``)."""
    event_loop: str = "auto"
    """The network loop: ``"auto"`` (uvloop where installed, else asyncio's), ``"uvloop"``
    or ``"asyncio"`` (``eventloop.py``)."""

    def __post_init__(self) -> None:
        _positive(self, "call_timeout_s", "stream_timeout_s", "connect_timeout_s")
        _positive(self, "max_clock_skew_s", "session_ttl_s", "max_sessions", "replay_window")
        _positive(self, "keepalive_s", "keepalive_timeout_s", "idle_close_s", "sweep_interval_s")
        _positive(self, "max_message_bytes", "chunk_bytes", "max_tracked_peers")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"NetConfig.port must be in [0, 65535], got {self.port!r}")
        if self.announce is not None and not is_host_port(self.announce):
            raise ConfigError(f"NetConfig.announce must be host:port, got {self.announce!r}")
        if self.chunk_bytes > MiB:
            raise ConfigError(f"NetConfig.chunk_bytes must be <= 1 MiB, got {self.chunk_bytes!r}")
        if self.max_message_bytes < self.chunk_bytes + 1024:
            raise ConfigError(
                f"NetConfig.max_message_bytes ({self.max_message_bytes!r}) must exceed "
                f"chunk_bytes + 1024 ({self.chunk_bytes + 1024!r})"
            )
        if not 0 <= self.shutdown_grace_s <= 1.5:
            raise ConfigError(
                f"NetConfig.shutdown_grace_s must be in [0, 1.5], got {self.shutdown_grace_s!r}"
            )
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                "NetConfig.event_loop must be 'auto', 'uvloop' or 'asyncio', "
                f"got {self.event_loop!r}"
            )
        if self.event_loop == "uvloop" and not uvloop_installed():
            raise ConfigError("NetConfig.event_loop is 'uvloop', but uvloop is not installed")
        if self.replay_window > 1 << 16:
            raise ConfigError(f"NetConfig.replay_window must be <= 65536, got {self.replay_window}")


__all__ = [
    "HealthConfig",
    "MiB",
    "NetConfig",
    "RetryPolicy",
    "TensorLimits",
    "is_host_port",
    "split_host_port",
]
