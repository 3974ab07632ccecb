"""Saving and restoring everything a local run needs to continue bit-exactly.

A checkpoint of a run holds the model, the AdamW state, torch's CPU (and CUDA) RNG states,
the data generator state (``extra.safetensors``), and in the manifest: the step, the batches
drawn so far, and the run config (used to refuse a checkpoint of a different model shape).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.errors import CheckpointError, DataError
from shoal.models.data import TrainWindows
from shoal.state.checkpoint import (
    LoadedCheckpoint,
    Snapshot,
    is_generator_state,
    meta_count,
    meta_section,
    take_snapshot,
)

log = logging.getLogger(__name__)

__all__ = ["checkpoint_root", "restore_run", "snapshot_run"]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def snapshot_run(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainWindows,
    config: dict[str, Any],
) -> Snapshot:
    """CPU snapshot of the run after ``step`` optimizer steps (training thread only)."""
    data_state = windows.state_dict()
    extra = {"rng.torch_cpu": torch.get_rng_state(), "data.generator": data_state["generator"]}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            extra[f"rng.cuda.{i}"] = state
    meta = {
        "config": config,
        "data": {
            "batches_drawn": data_state["batches_drawn"],
            "shard_index": windows.shard_index,
            "num_shards": windows.num_shards,
        },
    }
    return take_snapshot(step, model, optimizer, extra=extra, meta=meta)


def restore_run(
    ckpt: LoadedCheckpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainWindows,
    config: dict[str, Any],
) -> int:
    """Load ``ckpt`` into the run's objects; returns the step to continue from.

    Raises:
        CheckpointError: the checkpoint was written for another model shape or data shard,
            its meta is not what a run writes (a donor's is whatever it sent), or its
            tensors do not fit. Everything but the tensors is checked before any is loaded.
    """
    try:
        saved = meta_section(ckpt.meta, "config")
        data = meta_section(ckpt.meta, "data")
        batches_drawn = meta_count(data, "batches_drawn", 0)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: {exc}") from None
    if saved.get("model_shape") != config.get("model_shape"):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written for model {saved.get('model_shape')}, "
            f"not {config.get('model_shape')}"
        )
    if (data.get("shard_index"), data.get("num_shards")) != (
        windows.shard_index,
        windows.num_shards,
    ):
        raise CheckpointError(f"checkpoint {ckpt.path} belongs to another data shard: {data}")
    if ckpt.optimizer is None or "data.generator" not in ckpt.extra:
        raise CheckpointError(f"checkpoint {ckpt.path} lacks optimizer or data state")
    generator_states = [
        "data.generator",
        *(["rng.torch_cpu"] if "rng.torch_cpu" in ckpt.extra else []),
    ]
    for key in generator_states:  # a donor's: checked before anything is loaded
        if not is_generator_state(ckpt.extra[key]):
            raise CheckpointError(f"checkpoint {ckpt.path}: {key} is not a generator state")
    try:
        model.load_state_dict(ckpt.model, strict=True)
        optimizer.load_state_dict(ckpt.optimizer)
        windows.load_state_dict(
            {"generator": ckpt.extra["data.generator"], "batches_drawn": batches_drawn}
        )
    except (RuntimeError, ValueError, KeyError, TypeError, DataError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model: {exc}") from exc
    if "rng.torch_cpu" in ckpt.extra:
        torch.set_rng_state(ckpt.extra["rng.torch_cpu"])
    if torch.cuda.is_available():
        _restore_cuda_rng(ckpt.extra)
    return ckpt.step


def _restore_cuda_rng(extra: dict[str, torch.Tensor]) -> None:
    """The CUDA generators' states, when the checkpoint holds one per device here (best
    effort: they only decide dropout masks and the like)."""
    states: dict[int, torch.Tensor] = {}
    for key, state in extra.items():
        suffix = key[len("rng.cuda.") :] if key.startswith("rng.cuda.") else ""
        if suffix.isdigit() and isinstance(state, torch.Tensor) and state.dtype == torch.uint8:
            states[int(suffix)] = state
    if sorted(states) == list(range(torch.cuda.device_count())):
        try:
            torch.cuda.set_rng_state_all([states[i] for i in sorted(states)])
        except (RuntimeError, TypeError) as exc:
            log.warning("CUDA generator states not restored: %s", exc)
