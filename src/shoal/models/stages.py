"""Cutting the GPT into pipeline stages at block boundaries.

``split_stages(model, boundaries)`` returns one ``Stage`` per contiguous run of blocks. Stage 0
owns the token embedding; the last stage owns the final norm and the output head and computes
the loss. Running the stages in order performs exactly the operations of ``GPT.forward``, so
the outputs are bit-identical to the whole model.

The tied embedding. The head multiplies by the embedding matrix, which stage 0 also owns.
Two modes, chosen with ``tie``:

* ``"shared"`` (one process): the last stage references the very same ``nn.Parameter`` as
  stage 0; autograd accumulates both uses into one ``.grad``, nothing to synchronise.
* ``"copy"`` (stages in different processes): the last stage holds its own clone. The
  pipeline must keep the two copies equal: after backward, sum the embedding gradient of
  stage 0 and the head gradient of the last stage and apply the same update to both (the
  way Megatron all-reduces its tied embedding between first and last stage).
  ``Stage.tied_weight`` names the parameter concerned on either end.

Stages keep references to the model's modules (no copies except the ``"copy"`` head), so an
optimizer over the model's parameters also trains the stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import ConfigError
from shoal.models.config import ModelConfig
from shoal.models.gpt import GPT, Block, Rotary, lm_loss

__all__ = ["Stage", "split_stages", "stage_ranges"]


class Stage(nn.Module):
    """Blocks ``[start, stop)`` of a GPT, plus the embedding (first) or the head (last)."""

    def __init__(
        self,
        cfg: ModelConfig,
        index: int,
        start: int,
        stop: int,
        blocks: Sequence[Block],
        rotary: Rotary,
        *,
        embedding: nn.Embedding | None = None,
        ln_f: nn.LayerNorm | None = None,
        head_weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.start, self.stop = start, stop
        self.wte = embedding
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.ln_f = ln_f
        if (ln_f is None) != (head_weight is None):
            raise ValueError("the last stage needs both ln_f and head_weight")
        self.head_weight = head_weight

    @property
    def is_first(self) -> bool:
        return self.wte is not None

    @property
    def is_last(self) -> bool:
        return self.head_weight is not None

    @property
    def tied_weight(self) -> torch.Tensor | None:
        """The embedding matrix this stage uses (as input table or as output head), if any."""
        if self.head_weight is not None:
            return self.head_weight
        return self.wte.weight if self.wte is not None else None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Byte ids (B, T) on the first stage, hidden states (B, T, C) elsewhere.

        Returns hidden states (B, T, C), or on the last stage logits (B, T, V) or, with
        ``targets`` (B, T), the mean loss.
        """
        x = self.wte(inputs) if self.wte is not None else inputs  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rotary)
        if self.head_weight is None or self.ln_f is None:
            if targets is not None:
                raise ValueError(f"stage {self.index} is not the last stage; it takes no targets")
            return x
        logits = F.linear(self.ln_f(x), self.head_weight)  # (B, T, V)
        return logits if targets is None else lm_loss(logits, targets)


def stage_ranges(n_layer: int, boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """Block ranges ``[(start, stop), ...]`` for stages starting at each of ``boundaries``.

    ``boundaries`` are the block indices where stages 1.. begin, strictly increasing within
    ``[0, n_layer]`` (0 gives an embedding-only first stage, ``n_layer`` a head-only last stage).

    Raises:
        ConfigError: boundaries out of range or not strictly increasing.
    """
    cuts = list(boundaries)
    prev = -1
    for b in cuts:
        if not isinstance(b, int) or not 0 <= b <= n_layer or b <= prev:
            raise ConfigError(
                f"stage boundaries must increase strictly within [0, {n_layer}], got {cuts}"
            )
        prev = b
    edges = [0, *cuts, n_layer]
    return list(itertools.pairwise(edges))


def split_stages(
    model: GPT, boundaries: Sequence[int], *, tie: Literal["shared", "copy"] = "shared"
) -> list[Stage]:
    """Cut ``model`` into ``len(boundaries) + 1`` stages (see the module docstring for ``tie``)."""
    if tie not in ("shared", "copy"):
        raise ConfigError(f"tie must be 'shared' or 'copy', got {tie!r}")
    ranges = stage_ranges(model.cfg.n_layer, boundaries)
    stages = []
    last = len(ranges) - 1
    for i, (start, stop) in enumerate(ranges):
        head: nn.Parameter | None = None
        if i == last:
            head = cast(nn.Parameter, model.wte.weight)
            if tie == "copy":
                head = nn.Parameter(model.wte.weight.detach().clone())
        stages.append(
            Stage(
                model.cfg,
                i,
                start,
                stop,
                [cast(Block, b) for b in model.blocks[start:stop]],
                model.rotary,
                embedding=model.wte if i == 0 else None,
                ln_f=model.ln_f if i == last else None,
                head_weight=head,
            )
        )
    return stages
