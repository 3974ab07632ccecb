"""The reference model: a GPT-style byte-level language model.

Pre-norm transformer blocks with rotary positions, causal attention through
``scaled_dot_product_attention``, a GELU MLP and an output head tied to the token embedding.
Single-device code: parallelism is applied from outside (``shoal.models.stages`` cuts it into
pipeline stages; tensor parallelism can shard the clearly named ``q``/``k``/``v``/``o`` and
``fc_in``/``fc_out`` linears).

Calling convention shared with the pipeline stages: ``forward(idx)`` returns logits and
``forward(idx, targets)`` returns the mean cross-entropy loss in nats per byte.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shoal.models.config import ModelConfig

__all__ = ["GPT", "MLP", "Attention", "Block", "Rotary", "init_weights", "lm_loss"]


class Rotary(nn.Module):
    """Rotary position tables; ``rotate`` rotates pairs of channels of q or k."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # (T_max, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, nh, T, hs) by position."""
        t = x.shape[-2]
        cos = self.cos[:t].to(x.dtype)  # (T, hs/2)
        sin = self.sin[:t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)  # (B, nh, T, hs)

    def apply(self, fn):  # type: ignore[no-untyped-def, override]
        """Deprecated spelling of ``rotate`` for tensors; ``nn.Module.apply`` for functions."""
        if isinstance(fn, torch.Tensor):
            return self.rotate(fn)
        return super().apply(fn)


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v and output projections."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        hs = c // self.n_head
        q = self.q(x).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(b, t, self.n_head, hs).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_head, hs).transpose(1, 2)
        q, k = rotary.rotate(q), rotary.rotate(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.o(y)


class MLP(nn.Module):
    """Position-wise feed-forward: fc_in -> GELU -> fc_out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_hidden)
        self.fc_out = nn.Linear(cfg.d_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), rotary))  # (B, T, C)
        return x + self.dropout(self.mlp(self.ln2(x)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class GPT(nn.Module):
    """Byte-level GPT. The output head reuses ``wte.weight`` (tied embeddings)."""

    def __init__(
        self, cfg: ModelConfig, *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device(device or "cpu"):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
            self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        if self.wte.weight.device.type != "meta":
            init_weights(self, seed)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for byte ids ``idx`` (B, T), or the mean loss if ``targets``."""
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} > max_seq_len {self.cfg.max_seq_len}")
        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rotary)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V)
        return logits if targets is None else lm_loss(logits, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_weights(model: GPT, seed: int) -> None:
    """Initialise every parameter from ``seed`` alone, independent of the global RNG.

    Values are drawn on the CPU in ``named_parameters`` order and copied to the parameter's
    device, so the same seed gives identical weights on any device. Output projections
    (``o``, ``fc_out``) are scaled by 1/sqrt(2 * n_layer) as in GPT-2.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.cfg
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)

    def fill(p: torch.Tensor, value: torch.Tensor) -> None:
        p.copy_(value.to(dtype=p.dtype))

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name.rsplit(".", 1)[-1]
            std = residual_std if last in ("o", "fc_out") else cfg.init_std
            fill(module.weight, torch.randn(module.weight.shape, generator=gen) * std)
            if module.bias is not None:
                fill(module.bias, torch.zeros(module.bias.shape))
        elif isinstance(module, nn.Embedding):
            fill(module.weight, torch.randn(module.weight.shape, generator=gen) * cfg.init_std)
        elif isinstance(module, nn.LayerNorm):
            fill(module.weight, torch.ones(module.weight.shape))
            fill(module.bias, torch.zeros(module.bias.shape))
