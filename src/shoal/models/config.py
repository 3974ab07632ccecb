"""Model configuration and the named model sizes.

``ModelConfig`` fully describes the reference GPT; ``model_config(name, **overrides)`` returns
one of the named sizes, optionally with fields replaced. Parameter counts are computed
analytically (``ModelConfig.num_params``) so big sizes can be described without allocating.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shoal.errors import ConfigError

__all__ = ["MODEL_SIZES", "ModelConfig", "model_config"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the byte-level GPT."""

    vocab_size: int = 256
    """Number of token ids; 256 for raw bytes."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``d_model`` with an even head size."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model``."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables cover."""
    rope_base: float = 10000.0
    """Base of the rotary position frequencies."""
    dropout: float = 0.0
    """Dropout probability on attention and MLP outputs (0 disables it)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    norm_eps: float = 1e-5
    """Epsilon of the layer norms."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "mlp_ratio", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0 or (self.d_model // self.n_head) % 2 != 0:
            raise ConfigError(
                f"model.n_head={self.n_head} must divide model.d_model={self.d_model} "
                "into an even head size"
            )
        for name in ("rope_base", "dropout", "init_std", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"model.{name} must be a number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.init_std > 0.0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std!r}")
        if not self.rope_base > 1.0:
            raise ConfigError(f"model.rope_base must be > 1, got {self.rope_base!r}")
        if not self.norm_eps > 0.0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_hidden(self) -> int:
        return self.d_model * self.mlp_ratio

    def block_params(self) -> int:
        """Parameters in one block: two layer norms, q/k/v/o, fc_in/fc_out (with biases)."""
        d, h = self.d_model, self.d_hidden
        norms = 2 * 2 * d
        attn = 4 * (d * d + d)
        mlp = d * h + h + h * d + d
        return norms + attn + mlp

    def num_params(self) -> int:
        """Total trainable parameters (the tied embedding is counted once)."""
        embed = self.vocab_size * self.d_model
        final_norm = 2 * self.d_model
        return embed + self.n_layer * self.block_params() + final_norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_layer=2, n_head=4, max_seq_len=1024),
    "small": ModelConfig(d_model=384, n_layer=6, n_head=6, max_seq_len=1024),
    "base": ModelConfig(d_model=768, n_layer=16, n_head=12, max_seq_len=2048),
    "1b": ModelConfig(d_model=2048, n_layer=20, n_head=16, max_seq_len=2048),
}
"""Named sizes: tiny ~0.43M, small ~10.7M, base ~113M, 1b ~1.0B parameters."""


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The named size ``name`` with ``overrides`` applied.

    Raises:
        ConfigError: unknown name (the message lists the known ones) or invalid override.
    """
    try:
        base = MODEL_SIZES[name]
    except KeyError:
        known = ", ".join(MODEL_SIZES)
        raise ConfigError(f"unknown model {name!r}; choose one of: {known}") from None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown model field {unknown[0]!r}; fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(base, **overrides)
