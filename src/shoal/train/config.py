"""Configuration of a training run: typed sections, TOML loading, dotted overrides.

``TrainConfig`` is a tree of one dataclass per component. ``load_config(path)`` reads a TOML
file whose tables are the sections (``[model]``, ``[data]``, ``[optim]``, ``[schedule]``,
``[checkpoint]``, ``[run]``); ``with_overrides(cfg, {"run.steps": 600})`` replaces fields
(the CLI passes its flags this way). Every invalid value raises a one-line ``ConfigError``
naming the field and the value; unknown sections and keys are errors too.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError
from shoal.models.config import MODEL_SIZES, ModelConfig, model_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ModelChoice",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "with_overrides",
]


def _check(cond: bool, name: str, value: Any, want: str) -> None:
    if not cond:
        raise ConfigError(f"{name} must be {want}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(kw_only=True, slots=True)
class ModelChoice:
    """Which model: a named size, optionally with some shape fields replaced."""

    name: str = "tiny"
    """One of ``shoal.models.MODEL_SIZES``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to replace (TOML: any other key of ``[model]``)."""

    def __post_init__(self) -> None:
        if self.name not in MODEL_SIZES:
            raise ConfigError(
                f"unknown model {self.name!r}; choose one of: {', '.join(MODEL_SIZES)}"
            )
        self.build()

    def build(self) -> ModelConfig:
        return model_config(self.name, **self.overrides)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the bytes come from and how they are cut into batches."""

    dir: str | None = None
    """Directory of text files; None uses the embedded standard-library corpus."""
    seq_len: int = 128
    """Bytes per training window."""
    batch_size: int = 32
    """Windows per micro-batch."""
    val_fraction: float = 0.015
    """Share of files (by path hash) held out for validation."""
    eval_batches: int = 8
    """Validation batches per evaluation (fixed windows, same every time)."""
    shard_index: int = 0
    """Which training shard this process reads."""
    num_shards: int = 1
    """Into how many disjoint shards the training bytes are cut."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "eval_batches", "num_shards"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"data.{name}", v, "an integer >= 1")
        _check(
            _is_int(self.shard_index) and 0 <= self.shard_index < self.num_shards,
            "data.shard_index",
            self.shard_index,
            f"an integer in [0, {self.num_shards})",
        )
        v = self.val_fraction
        _check(_is_num(v) and 0 < v <= 0.5, "data.val_fraction", v, "in (0, 0.5]")
        _check(self.dir is None or isinstance(self.dir, str), "data.dir", self.dir, "a path")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW and the gradient path."""

    lr: float = 6e-3
    """Peak learning rate."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on biases or norms)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    def __post_init__(self) -> None:
        _check(_is_num(self.lr) and self.lr > 0, "optim.lr", self.lr, "> 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 <= v < 1, f"optim.{name}", v, "in [0, 1)")
        _check(_is_num(self.eps) and self.eps > 0, "optim.eps", self.eps, "> 0")
        v = self.weight_decay
        _check(_is_num(v) and v >= 0, "optim.weight_decay", v, ">= 0")
        _check(
            _is_num(self.grad_clip) and self.grad_clip >= 0,
            "optim.grad_clip",
            self.grad_clip,
            ">= 0",
        )
        v = self.grad_accum
        _check(_is_int(v) and v >= 1, "optim.grad_accum", v, "an integer >= 1")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 30
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        v = self.warmup_steps
        _check(_is_int(v) and v >= 0, "schedule.warmup_steps", v, "an integer >= 0")
        r = self.min_lr_ratio
        _check(_is_num(r) and 0 <= r <= 1, "schedule.min_lr_ratio", r, "in [0, 1]")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 200
    """Write a checkpoint every this many steps (and at the end); 0 disables checkpoints."""
    keep_last: int = 3

    def __post_init__(self) -> None:
        v = self.every_steps
        _check(_is_int(v) and v >= 0, "checkpoint.every_steps", v, "an integer >= 0")
        v = self.keep_last
        _check(_is_int(v) and v >= 1, "checkpoint.keep_last", v, "an integer >= 1")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The run as a whole."""

    steps: int = 600
    """Optimizer steps to reach (counting steps done before a resume)."""
    seed: int = 0
    """Seeds model init, the data stream and torch's RNGs."""
    run_dir: str = "runs/train"
    """Where checkpoints go; nothing is written outside it."""
    eval_every: int = 100
    """Validate every this many steps (and at the end); 0 only at the end."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]``."""
    threads: int = 0
    """Torch intra-op threads on CPU; 0 uses the cores this process may run on."""
    resume: bool = False
    """Continue from the newest valid checkpoint in ``run_dir`` if there is one."""

    def __post_init__(self) -> None:
        _check(_is_int(self.steps) and self.steps >= 1, "run.steps", self.steps, "an integer >= 1")
        _check(_is_int(self.seed) and self.seed >= 0, "run.seed", self.seed, "an integer >= 0")
        v = self.eval_every
        _check(_is_int(v) and v >= 0, "run.eval_every", v, "an integer >= 0")
        _check(_is_int(self.threads) and self.threads >= 0, "run.threads", self.threads, ">= 0")
        ok = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _check(ok, "run.device", self.device, "auto, cpu, cuda or cuda:N")
        _check(bool(self.run_dir), "run.run_dir", self.run_dir, "a non-empty path")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything a local training run needs."""

    model: ModelChoice = field(default_factory=ModelChoice)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        max_len = self.model.build().max_seq_len
        if self.data.seq_len > max_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model max_seq_len={max_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelChoice,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig,
    "run": RunConfig,
}


def _section_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def with_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with dotted keys (``"optim.lr"``) replaced; None values are skipped.

    In the ``model`` section any key but ``name`` is a ModelConfig field override.
    """
    sections = {name: getattr(cfg, name) for name in _SECTIONS}
    changes: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if section not in _SECTIONS or not name:
            raise ConfigError(f"unknown config key {key!r}; sections: {', '.join(_SECTIONS)}")
        if section == "model" and name != "name":
            overrides = dict(changes.get("model", {}).get("overrides", sections["model"].overrides))
            overrides[name] = value
            changes.setdefault("model", {})["overrides"] = overrides
            continue
        if name not in _section_fields(_SECTIONS[section]):
            known = ", ".join(sorted(_section_fields(_SECTIONS[section])))
            raise ConfigError(f"unknown config key {key!r}; {section} has: {known}")
        changes.setdefault(section, {})[name] = value
    for section, fields in changes.items():
        sections[section] = dataclasses.replace(sections[section], **fields)
    return TrainConfig(**sections)


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML config file on top of ``base`` (defaults if None).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown section/key or invalid value.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {str(path)!r}: {section!r} must be a [table]")
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    return with_overrides(base or TrainConfig(), flat)
