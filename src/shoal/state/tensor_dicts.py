"""Optimizer state dicts as flat tensor maps plus JSON, so they can go into safetensors.

``torch.optim`` state dicts nest tensors and Python scalars:
``{"state": {param_id: {name: tensor | number}}, "param_groups": [{..., "params": [ids]}]}``.
``flatten_optimizer_state`` turns that into ``{"state.<id>.<name>": tensor}`` plus a JSON-able
dict holding the scalars and the param groups; ``unflatten_optimizer_state`` inverts it.
No pickle anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.errors import CheckpointError

__all__ = ["flatten_optimizer_state", "unflatten_optimizer_state"]


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"optimizer state holds a {type(value).__name__}, which is not storable")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def flatten_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict()`` into (tensors, JSON-able metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{int(pid)}.{name}"] = value
            else:
                scalars.setdefault(str(int(pid)), {})[name] = _to_json(value)
    meta = {"scalars": scalars, "param_groups": _to_json(state_dict["param_groups"])}
    return tensors, meta


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Rebuild the ``state_dict()`` that ``flatten_optimizer_state`` split.

    Raises:
        CheckpointError: a tensor key or the metadata does not have the expected shape.
    """
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            prefix, pid, name = key.split(".", 2)
            if prefix != "state":
                raise ValueError(key)
            state.setdefault(int(pid), {})[name] = value
        for pid, entries in meta["scalars"].items():
            for name, value in entries.items():
                state.setdefault(int(pid), {})[name] = _from_json(value)
        groups = _from_json(meta["param_groups"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"optimizer state is malformed: {exc!r}") from exc
    return {"state": state, "param_groups": groups}
