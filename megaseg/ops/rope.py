"""Rotary position embedding with Llama's conventions (rotate-half layout, HF-compatible).

Shape legend: B batch, L tokens, H heads, D head dim.
"""
from __future__ import annotations

import math

import torch

from megaseg.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, matching transformers' default/linear/llama3 rope."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling_type == "llama3":
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq_llama / rope.factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq


class Rotary(torch.nn.Module):
    """cos/sin tables for positions 0 .. max_positions-1, grown on demand."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inv_frequencies(rope, head_dim), persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, n: int, device, dtype):
        """cos/sin [>= n, D] in ``dtype`` on ``device`` (cached per device and dtype)."""
        key = (torch.device(device), dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < n:
            size = max(n, 64 if cached is None else 2 * cached[0].shape[0])
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._tables[key]

    def rotate_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [..., L, H, D] at the consecutive positions start .. start+L-1 (a slice
        of the tables, no gather); equal to ``forward`` with those positions."""
        n = x.shape[-3]
        cos, sin = self.tables(start + n, x.device, x.dtype)
        cos, sin = cos[start : start + n, None], sin[start : start + n, None]
        return x * cos + _rotate_half(x) * sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., L, H, D] at integer positions broadcastable to x.shape[:-2]."""
        n = int(positions.max().item()) + 1 if positions.numel() else 1
        cos, sin = self.tables(n, x.device, x.dtype)
        cos = cos[positions].unsqueeze(-2)
        sin = sin[positions].unsqueeze(-2)
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
