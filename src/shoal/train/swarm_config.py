"""``PeerOptions``: everything ``shoal peer`` needs to run a data-parallel swarm peer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shoal.compress.registry import STATELESS_CODECS
from shoal.errors import ConfigError
from shoal.net.config import is_host_port
from shoal.parallel.data.aggregate import check_kind
from shoal.state.snapshot import MAX_PROGRESS
from shoal.train.outer import OuterConfig

__all__ = ["MODES", "PeerOptions"]

MODES = ("sync", "diloco", "streaming")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerOptions:
    """A swarm training peer (see ``docs/peer.md``)."""

    mode: str = "diloco"
    """``sync`` (collaborative global batch), ``diloco`` or ``streaming`` (streaming DiLoCo)."""
    join: tuple[str, ...] = ()
    """Bootstrap ``host:port`` addresses; empty = first peer of a new swarm."""
    run_dir: Path = Path("runs/peer")
    """Identity key, checkpoints."""
    data_dir: str | None = None
    """Text files to train on (default: the embedded standard-library corpus)."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 0
    """TCP port (0 = any free port; the chosen one is printed)."""
    announce: str | None = None
    """``host:port`` published to the swarm instead of the listener's (a proxy in front)."""
    metrics_port: int | None = None
    """Prometheus ``/metrics`` port (None = off, 0 = any)."""
    events: Path | None = None
    """JSONL event log path."""
    swarm: str = "default"
    """Swarm name (DHT key namespace)."""
    swarm_key: bytes = b""
    """Pre-shared key of a closed swarm (empty = open)."""
    model: str = "tiny"
    """Named model size."""
    model_overrides: dict[str, int] = field(default_factory=dict)
    """Fields of the model config to replace (e.g. ``{"n_layer": 1}``)."""
    seq_len: int = 64
    batch_size: int = 8
    """Sequences per local step."""
    lr: float = 3e-3
    """Inner AdamW peak learning rate."""
    warmup_steps: int = 30
    steps: int = 1_000_000
    """Stop after this many local steps (the LR schedule's horizon)."""
    seed: int = 0
    """Model initialisation seed (equal on every peer)."""
    shard_index: int | None = None
    """Data shard of this peer; None = random windows with a seed derived from the PeerID."""
    num_shards: int = 1
    threads: int = 1
    """Torch threads."""
    local_steps: int = 50
    """DiLoCo H."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    wire_codec: str = "int8"
    """Codec of pseudo-gradients / gradients on the wire."""
    aggregation: str = "mean"
    """How reducers combine contributions (``RoundsConfig.aggregation``)."""
    client_mode: bool = False
    """Average without reducing or being dialed: send parts, pull results (a slow peer, or
    one that cannot accept connections). Such a peer runs a client-only DHT node and is no
    state donor."""
    check_reachability: bool = True
    """With ``join``: first ask the join addresses to dial this peer back. When some tried
    and none reached it (a peer behind a NAT), it reserves a slot at a join peer that
    relays and reduces through it, or else turns ``client_mode`` on."""
    relay: bool = False
    """Hold relay reservations for peers behind NATs (a peer others can reach)."""
    rank: int = 0
    """DiLoCo: average pseudo-gradients through rank-``rank`` factors (0 = whole tensors)."""
    topk: float = 0.0
    """DiLoCo: send only this fraction of each pseudo-gradient, its largest values, with
    error feedback (0 = whole tensors); they travel in the ``sparse`` wire codec."""
    fragments: int = 4
    """Streaming DiLoCo: number of parameter fragments."""
    overlap_steps: int | None = None
    """Streaming DiLoCo: local steps a fragment's all-reduce may overlap before it is waited
    for (None: 5, at most ``local_steps // fragments``; see :attr:`overlap`)."""
    mix_alpha: float = 0.5
    """Streaming DiLoCo: weight of the local fragment when merging in the new outer one."""
    target_batch: int = 256
    """Sync mode: global samples per optimizer step."""
    window_s: float = 15.0
    """First matchmaking window."""
    allreduce_timeout_s: float = 30.0
    max_group_size: int = 64
    """Largest all-reduce group; a round of more ready peers goes on across its groups
    (peers of different sizes do not meet: they would cut a round into different groups)."""
    heartbeat_s: float = 3.0
    """Membership heartbeat and refresh period."""
    checkpoint_every_rounds: int = 1
    """Write a checkpoint to disk every N applied rounds (a servable snapshot every round)."""
    eval_every_rounds: int = 0
    """Validate every N rounds (0 = only at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation (fixed, evenly spaced windows; more than the split
    holds takes all of it)."""
    report_every: int = 10
    """Print a step line every N local steps."""
    json: bool = False
    """Progress as JSON lines on stdout."""

    @property
    def overlap(self) -> int:
        """``overlap_steps``, or its default: 5, capped so that small ``local_steps`` work."""
        if self.overlap_steps is not None:
            return self.overlap_steps
        return min(5, self.local_steps // max(1, self.fragments))

    def model_config_overrides(self) -> dict[str, object]:
        """``TrainConfig`` overrides that pick this peer's model (name and shape flags)."""
        return {"model.name": self.model} | {
            f"model.{name}": value for name, value in self.model_overrides.items()
        }

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("seq_len", "batch_size", "steps", "local_steps", "fragments", "target_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.swarm or len(self.swarm) > 64 or not self.swarm.isprintable():
            raise ConfigError(f"swarm must be 1..64 printable characters, got {self.swarm!r}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir {self.data_dir!r} is not a directory")
        if self.wire_codec not in STATELESS_CODECS:
            raise ConfigError(
                f"wire_codec must be one of {', '.join(STATELESS_CODECS)}, got {self.wire_codec!r}"
            )
        check_kind(self.aggregation, "aggregation")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.num_shards < 1 or (
            self.shard_index is not None and not 0 <= self.shard_index < self.num_shards
        ):
            raise ConfigError(
                f"shard {self.shard_index!r}/{self.num_shards!r}: need 0 <= I < N for shard I/N"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port!r}")
        if self.host in ("0.0.0.0", "::", "") and self.announce is None:
            raise ConfigError(
                f"listening on all interfaces ({self.host!r}) needs announce (--announce "
                "HOST:PORT): the address other peers dial"
            )
        if self.mode == "streaming" and self.fragments > self.local_steps:
            raise ConfigError(
                f"fragments ({self.fragments}) must not exceed local_steps ({self.local_steps})"
            )
        if self.mode == "streaming" and self.fragments > MAX_PROGRESS:
            # each fragment's count of applied rounds is announced with snapshots
            raise ConfigError(f"fragments must be at most {MAX_PROGRESS}, got {self.fragments}")
        if self.mode == "streaming" and not (
            0 <= self.overlap <= self.local_steps // self.fragments
        ):
            raise ConfigError(
                f"--overlap-steps must be in [0, {self.local_steps // self.fragments}] "
                f"(-H {self.local_steps} // --fragments {self.fragments}), "
                f"got {self.overlap!r}"
            )
        if not 0 <= self.mix_alpha < 1:
            raise ConfigError(f"mix_alpha must be in [0, 1), got {self.mix_alpha!r}")
        for name in ("window_s", "heartbeat_s", "allreduce_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.checkpoint_every_rounds < 0 or self.eval_every_rounds < 0:
            raise ConfigError("checkpoint_every_rounds and eval_every_rounds must be >= 0")
        if not 2 <= self.max_group_size <= 256:  # a board read shows at most 256 entries
            raise ConfigError(f"max_group_size must be in [2, 256], got {self.max_group_size!r}")
        for name in ("report_every", "threads", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if self.rank and self.mode != "diloco":
            raise ConfigError(f"rank (low-rank averaging) is for mode diloco, not {self.mode}")
        if not 0 <= self.topk < 1:
            raise ConfigError(f"topk must be a fraction in [0, 1), got {self.topk!r}")
        if self.topk and self.mode != "diloco":
            raise ConfigError(f"topk (sparse averaging) is for mode diloco, not {self.mode}")
        if self.topk and self.rank:
            raise ConfigError("rank and topk are two ways to compress: choose one")
        if self.topk and self.wire_codec != "sparse":
            raise ConfigError(
                f"topk sends (position, value) pairs: it needs wire_codec sparse, "
                f"not {self.wire_codec}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in [0, 65535], got {self.metrics_port!r}")
        for address in self.join:
            if not is_host_port(address):
                raise ConfigError(f"join addresses must be HOST:PORT, got {address!r}")
