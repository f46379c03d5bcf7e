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
        qpos = torch.arange(q_offset, q_offset + Q, device=dev)
        causal_QK = torch.arange(K, device=dev)[None, :] <= qpos[:, None]
        if P:
            pre_ok_NP = torch.arange(P, device=dev)[None, :] < pre_len_N[:, None]
            mask = torch.cat([pre_ok_NP[:, None, :].expand(N, Q, P), causal_QK.expand(N, Q, K)], 2)
        else:
            mask = causal_QK.expand(N, Q, K)
        m = mask.unsqueeze(0).expand(B, N, Q, P + K).reshape(B * N, 1, Q, P + K)
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=m, enable_gqa=h != g)
    return o.transpose(1, 2).reshape(B, N, Q, h, D)
