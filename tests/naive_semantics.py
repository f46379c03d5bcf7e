"""A deliberately naive, loop-per-token reading of docs/semantics.md §2–4 for one layer.

Independent of megaseg.ops: it builds, for every query token, the explicit list of keys it
may see and their rotary positions, and computes softmax attention by hand. Slow; tiny
inputs only.
"""
from __future__ import annotations

import math

import torch


def rotate(x_D: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama rotate-half RoPE of one head vector at integer position ``pos``."""
    ang = float(pos) * inv_freq.float()  # fp32 angles, as Llama (and transformers) compute them
    cos = torch.cat([ang.cos(), ang.cos()]).to(x_D.dtype)
    sin = torch.cat([ang.sin(), ang.sin()]).to(x_D.dtype)
    half = x_D.shape[-1] // 2
    rot = torch.cat([-x_D[half:], x_D[:half]])
    return x_D * cos + rot * sin


def retrieved_tokens(q_THD, k_TGD, group, hpg, seg_index, S, R, reduce="sum"):
    """Token indices of R_{i-1} for segment ``seg_index`` in original order (§4)."""
    end = seg_index * S - 1
    heads = q_THD[end, group * hpg : (group + 1) * hpg].double()
    combine = (lambda s: s.sum()) if reduce == "sum" else (lambda s: s.max())
    scores = [(-combine(heads @ k_TGD[t, group].double()).item(), t) for t in range(seg_index * S)]
    return sorted(t for _, t in sorted(scores)[:R])


def naive_layer(q_BTHD, k_BTGD, v_BTGD, modes, S, M, R, inv_freq, reduce="sum"):
    B, T, H, D = q_BTHD.shape
    G = k_BTGD.shape[2]
    hpg = H // G
    out = torch.zeros_like(q_BTHD)
    for b in range(B):
        for h in range(H):
            g = h // hpg
            mode = modes[g]
            for a in range(T):
                i, j = divmod(a, S)
                if i == 0 or mode == "segment":
                    prefix = []
                elif mode == "local":
                    prefix = list(range(i * S - M, i * S))
                else:
                    prefix = retrieved_tokens(q_BTHD[b], k_BTGD[b], g, hpg, i, S, R, reduce)
                P = len(prefix)
                keys = prefix + list(range(i * S, a + 1))
                pos = list(range(P)) + [P + t for t in range(j + 1)]
                qr = rotate(q_BTHD[b, a, h], P + j, inv_freq)
                ks = torch.stack([rotate(k_BTGD[b, t, g], p, inv_freq) for t, p in zip(keys, pos)])
                vs = torch.stack([v_BTGD[b, t, g] for t in keys])
                w = torch.softmax((ks @ qr) / math.sqrt(D), 0)
                out[b, a, h] = w @ vs
    return out
