"""The reference kernel: torch scaled_dot_product_attention with explicit masks.

KV groups whose prefix lengths agree in every segment share their positions and mask, so
they run together: a layer runs one SDPA call per distinct prefix-length column (in
practice one per access mode present: local groups carry the tail, retrieval groups the
retrieved tokens, segment groups nothing). Groups without any prefix take SDPA's plain
causal path. Keys and queries are rotated here (RoPE with per-segment positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaseg.ops.kernels import SegmentBatch


def attend(batch: SegmentBatch, rotary) -> torch.Tensor:
    """Attention output [B, N, Q, H, D] of ``batch`` (see `SegmentBatch`)."""
    runs = _equal_prefix_runs(batch.prefix_len)
    if len(runs) > 1:  # e.g. a chunk that starts the sequence: its first segment has no prefix
        return torch.cat([attend(_rows(batch, a, b), rotary) for a, b in runs], 1)
    G = batch.k.shape[3]
    hpg = batch.heads_per_group
    classes: dict[tuple[int, ...], list[int]] = {}
    for g, column in enumerate(batch.prefix_len.t().tolist()):
        classes.setdefault(tuple(column), []).append(g)
    if len(classes) == 1:
        return _attend_groups(batch, rotary, None, batch.prefix_len[:, 0])
    out = [None] * G
    for groups in classes.values():
        o = _attend_groups(batch, rotary, groups, batch.prefix_len[:, groups[0]])
        for i, g in enumerate(groups):
            out[g] = o[:, :, :, i * hpg : (i + 1) * hpg]
    return torch.cat(out, 3)


def _equal_prefix_runs(prefix_len_NG: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive segments with the same prefix lengths: each runs as
    one call with one shared mask (prefix lengths only grow along a sequence, so a chunk
    has at most a few runs)."""
    rows = prefix_len_NG.tolist()
    runs, start = [], 0
    for n in range(1, len(rows) + 1):
        if n == len(rows) or rows[n] != rows[start]:
            runs.append((start, n))
            start = n
    return runs


def _rows(batch: SegmentBatch, a: int, b: int) -> SegmentBatch:
    """Segments [a, b) of ``batch`` (views)."""
    pre_k = None if batch.prefix_k is None else batch.prefix_k[:, a:b]
    pre_v = None if batch.prefix_v is None else batch.prefix_v[:, a:b]
    return SegmentBatch(batch.q[:, a:b], batch.k[:, a:b], batch.v[:, a:b], pre_k, pre_v, batch.prefix_len[a:b],
                        batch.q_offset)


def _attend_groups(batch: SegmentBatch, rotary, groups, pre_len_N):
    """Causal attention of the queries of ``groups`` (None: all) over [prefix ; segment]."""
    q, k, v, pre_k, pre_v = batch.q, batch.k, batch.v, batch.prefix_k, batch.prefix_v
    if groups is not None:
        hpg = batch.heads_per_group
        gidx = torch.tensor(groups, device=q.device)
        hidx = (gidx[:, None] * hpg + torch.arange(hpg, device=q.device)).flatten()
        q, k, v = q.index_select(3, hidx), k.index_select(3, gidx), v.index_select(3, gidx)
        if pre_k is not None:
            pre_k, pre_v = pre_k.index_select(3, gidx), pre_v.index_select(3, gidx)
    P = int(pre_len_N.max()) if pre_k is not None and pre_len_N.numel() else 0
    B, N, Q, h, D = q.shape
    K, g = k.shape[2], k.shape[3]
    q_offset = batch.q_offset
    dev = q.device
    if N == 1 or bool((pre_len_N == pre_len_N[0]).all()):
        # One prefix length: consecutive positions, rotated from a slice of the tables.
        p0 = int(pre_len_N[0]) if pre_len_N.numel() else 0
        q_rot = rotary.rotate_from(q, p0 + q_offset)
        k_rot = rotary.rotate_from(k, p0)
    else:
        key_pos = pre_len_N[:, None] + torch.arange(K, device=dev)  # [N, K]
        q_rot = rotary(q, key_pos[:, q_offset : q_offset + Q])
        k_rot = rotary(k, key_pos)
    v_cat = v
    if P:
        pre_k, pre_v = pre_k[:, :, :P], pre_v[:, :, :P]
        k_rot = torch.cat([rotary.rotate_from(pre_k, 0), k_rot], 2)
        v_cat = torch.cat([pre_v, v], 2)
    # [B*N, heads, tokens, D] for scaled_dot_product_attention.
    qf = q_rot.reshape(B * N, Q, h, D).transpose(1, 2)
    kf = k_rot.reshape(B * N, P + K, g, D).transpose(1, 2)
    vf = v_cat.reshape(B * N, P + K, g, D).transpose(1, 2)
    if P == 0 and q_offset == 0 and Q == K:
        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=h != g)
    else:
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=_additive_mask(pre_len_N, B, Q, P, K, q_offset, qf.dtype),
                                           enable_gqa=h != g)
    return o.transpose(1, 2).reshape(B, N, Q, h, D)


def _additive_mask(pre_len_N, B: int, Q: int, P: int, K: int, q_offset: int, dtype) -> torch.Tensor:
    """The additive mask (0 visible, -inf not) of queries ``q_offset .. q_offset + Q`` over
    [prefix (P slots, the first pre_len valid) ; K segment keys (causal)], for B x N
    calls: [1, 1, Q, P + K] when every segment has the same prefix length (`attend` makes
    every call so), else [B*N, 1, Q, P + K].

    The same values SDPA derives from a boolean mask, built here so that the mask autograd
    saves for the backward is the one shared [Q, P + K] matrix instead of one per segment
    (SDPA would save the float conversion of a boolean mask at full size: for a
    context-parallel chunk of C segments, C x Q x (P + K) elements per call)."""
    dev = pre_len_N.device
    N = pre_len_N.numel()
    qpos = torch.arange(q_offset, q_offset + Q, device=dev)
    causal_QK = torch.arange(K, device=dev)[None, :] <= qpos[:, None]
    uniform = N == 1 or bool((pre_len_N == pre_len_N[0]).all())
    rows = pre_len_N[:1] if uniform else pre_len_N
    if P:
        pre_ok_NP = torch.arange(P, device=dev)[None, :] < rows[:, None]
        ok = torch.cat([pre_ok_NP[:, None, :].expand(rows.numel(), Q, P), causal_QK.expand(rows.numel(), Q, K)], 2)
    else:
        ok = causal_QK.expand(rows.numel(), Q, K)
    mask = torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill_(~ok, float("-inf")).unsqueeze(1)
    if uniform:
        return mask  # [1, 1, Q, P + K], broadcast over the B x N calls
    return mask.unsqueeze(0).expand(B, N, 1, Q, P + K).reshape(B * N, 1, Q, P + K)
