"""Initial weights that do not depend on the parallel layout.

Every parameter of a fresh run is drawn whole, in its global (unsharded) shape, from a
generator seeded by the run seed and the parameter's name (HF Llama names), then sharded
like pretrained weights. So TP, PP, CP and DP layouts start from the same model, and the
same seed gives the same loss curve at any layout (before, each pipeline stage drew its
weights from a different point of one RNG stream).

The distribution is megatron's: normal(0, init_method_std) for every linear and the
embedding, with the output projections of attention and MLP (o_proj, down_proj) scaled by
1/sqrt(2 x num_layers); norms are one, biases zero. The whole reference state dict is built
on each rank, one model's worth of host memory, as for ``--pretrained-checkpoint``.
"""
from __future__ import annotations

import hashlib
import math

import torch

from megaseg.config import ModelConfig


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for parameter ``name`` of a run seeded ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def initial_weights(cfg: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Reference (HF Llama-named) fp32 weights of a fresh model, a function of (cfg, seed, std) only."""
    from megaseg.checkpoint.weights import expected_shapes

    scaled = std / math.sqrt(2.0 * cfg.num_layers)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(name_seed(seed, name))
            sigma = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = torch.empty(shape).normal_(0.0, sigma, generator=g)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
