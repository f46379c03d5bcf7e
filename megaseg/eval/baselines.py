"""Baseline attention cores: other inference modes of the same weights.

Each core replaces ``layer.self_attn.core`` of the reference model and has the operator's
call signature ``core(q_BLHD, k_BLGD, v_BLGD, state) -> (out_BLHD, state)`` with
un-rotated q/k/v; RoPE is applied inside with the model's ``RopeConfig``. Like the
segmented operator, any split of a sequence into calls gives the same output, so the
evaluator streams every mode chunk by chunk and the state held between chunks is the
mode's real cache.

Per KV group (all query heads of a group share it) one of:

``full``     causal attention over every earlier token; RoPE at absolute positions
             0..t (full attention; positions grow with the context).
``window``   StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the last
             ``window`` tokens including the query. Positions are those of the rolling
             cache: sinks at 0..sinks-1 and the window right after them, so a query at t
             sees a window key at its true distance t - a and sink i at distance
             min(t, sinks + window - 1) - i. The largest position is sinks + window - 1.
``segment``  the query's own segment of ``segment_length`` tokens only, causally
             (positions inside the segment; equals megaseg's `segment` mode); with
             ``tail`` = M > 0 also the last M tokens of the previous segment (megaseg's
             `local` mode, at true relative distances).

Modes: full attention = every group ``full``; StreamingLLM = every group ``window``;
DuoAttention-style = chosen (layer, group) ``full``, the rest ``window``. The ``segment``
mode is what calibrated head selection cuts a group to.

Shape legend: B batch, L new tokens, K keys, H query heads, G KV groups, h/g heads/groups
of one mode, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from megaseg.config import ConfigError, RopeConfig
from megaseg.ops.rope import Rotary

FULL, WINDOW, SEGMENT_CUT = "full", "window", "segment"
BASELINE_MODES = (FULL, WINDOW, SEGMENT_CUT)


@dataclass
class CacheState:
    """What a baseline core keeps between calls (un-rotated keys/values).

    full_*:   [B, t, g_full, D] every token so far, for `full` groups.
    sink_*:   [B, <=sinks, g_win, D] the first tokens, for `window` groups.
    win_*:    [B, <=window-1, g_win, D] the most recent non-sink tokens, for `window` groups.
    seg_*:    [B, <= M + t % S, g_seg, D] the open segment (and tail), for `segment` groups.
    """

    tokens: int = 0
    full_k: torch.Tensor | None = None
    full_v: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    win_k: torch.Tensor | None = None
    win_v: torch.Tensor | None = None
    seg_k: torch.Tensor | None = None
    seg_v: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def detached(self) -> "CacheState":
        return replace(self, **{k: v.detach() for k, v in self.tensors().items()})


class BaselineAttention(torch.nn.Module):
    """Attention core with a per-KV-group baseline mode (see the module docstring)."""

    def __init__(self, modes, rope: RopeConfig, head_dim: int, heads_per_group: int, sinks: int = 4,
                 window: int = 256, segment_length: int | None = None, tail: int = 0):
        super().__init__()
        self.modes = tuple(modes)
        for m in self.modes:
            if m not in BASELINE_MODES:
                raise ConfigError(f"baseline mode={m!r} is invalid: allowed {BASELINE_MODES}")
        if WINDOW in self.modes and (not isinstance(window, int) or window < 1 or not isinstance(sinks, int) or sinks < 0):
            raise ConfigError(f"window={window!r}, sinks={sinks!r} are invalid: need window >= 1 and sinks >= 0")
        if SEGMENT_CUT in self.modes and (not isinstance(segment_length, int) or segment_length < 1):
            raise ConfigError(f"segment_length={segment_length!r} is invalid: `segment` groups need an integer >= 1")
        if not isinstance(tail, int) or tail < 0 or (segment_length and tail > segment_length):
            raise ConfigError(f"tail={tail!r} is invalid: must be an integer in [0, segment_length]")
        self.sinks, self.window, self.segment_length, self.tail = sinks, window, segment_length, tail
        self.hpg, self.head_dim = heads_per_group, head_dim
        self.rotary = Rotary(rope, head_dim)
        self.groups = {m: [g for g, mm in enumerate(self.modes) if mm == m] for m in BASELINE_MODES}
        order = []
        for m in BASELINE_MODES:
            gs = self.groups[m]
            self.register_buffer(f"_{m}_groups", torch.tensor(gs, dtype=torch.long), persistent=False)
            heads = [g * heads_per_group + h for g in gs for h in range(heads_per_group)]
            self.register_buffer(f"_{m}_heads", torch.tensor(heads, dtype=torch.long), persistent=False)
            order += heads
        self.register_buffer("_unpermute", torch.argsort(torch.tensor(order, dtype=torch.long)), persistent=False)

    def extra_repr(self) -> str:
        return (f"modes={self.modes}, sinks={self.sinks}, window={self.window}, segment_length={self.segment_length}, "
                f"tail={self.tail}")

    def forward(self, q_BLHD, k_BLGD, v_BLGD, state=None):
        state = state if isinstance(state, CacheState) else CacheState()
        B, L, H, D = q_BLHD.shape
        if k_BLGD.shape[2] != len(self.modes) or H != len(self.modes) * self.hpg:
            raise ValueError(f"got {H} query heads / {k_BLGD.shape[2]} KV groups, core has {len(self.modes)} groups x {self.hpg}")
        new = CacheState(tokens=state.tokens + L)
        outs = []
        for m in BASELINE_MODES:
            if not self.groups[m]:
                continue
            q = q_BLHD.index_select(2, getattr(self, f"_{m}_heads"))
            gidx = getattr(self, f"_{m}_groups")
            k, v = k_BLGD.index_select(2, gidx), v_BLGD.index_select(2, gidx)
            outs.append(getattr(self, f"_{m}")(q, k, v, state, new))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2).index_select(2, self._unpermute)
        return out, new

    # ---- modes ---------------------------------------------------------------------------
    def _full(self, q, k, v, state, new):
        t0, L = state.tokens, q.shape[1]
        keys = torch.cat([state.full_k, k], 1) if state.full_k is not None else k
        vals = torch.cat([state.full_v, v], 1) if state.full_v is not None else v
        new.full_k, new.full_v = keys, vals
        dev = q.device
        qpos = t0 + torch.arange(L, device=dev)
        kpos = torch.arange(keys.shape[1], device=dev)
        mask = kpos[None, :] <= qpos[:, None]
        return self._sdpa(self.rotary(q, qpos), self.rotary(keys, kpos), vals, mask)

    def _window(self, q, k, v, state, new):
        t0, L = state.tokens, q.shape[1]
        s, w = self.sinks, self.window
        dev = q.device
        parts_k = [t for t in (state.sink_k, state.win_k) if t is not None] + [k]
        parts_v = [t for t in (state.sink_v, state.win_v) if t is not None] + [v]
        n_sink = 0 if state.sink_k is None else state.sink_k.shape[1]
        n_win = 0 if state.win_k is None else state.win_k.shape[1]
        keys, vals = torch.cat(parts_k, 1), torch.cat(parts_v, 1)
        kabs = torch.cat([torch.arange(n_sink, device=dev), torch.arange(t0 - n_win, t0, device=dev),
                          t0 + torch.arange(L, device=dev)])
        qabs = t0 + torch.arange(L, device=dev)
        is_sink = kabs < s
        mask = (kabs[None, :] <= qabs[:, None]) & (is_sink[None, :] | (qabs[:, None] - kabs[None, :] < w))
        # Scores against window keys use true positions; against sinks the query sits at
        # its rolling-cache slot min(t, s + w - 1).
        k_rot = self.rotary(keys, kabs)
        q_win = self.rotary(q, qabs)
        q_sink = self.rotary(q, torch.clamp(qabs, max=s + w - 1))
        out = self._attend(q_win, k_rot, vals, mask, q_sink=q_sink, sink_keys=is_sink)
        end = t0 + L
        keep_sink = kabs < s
        keep_win = (~keep_sink) & (kabs >= end - (w - 1))
        new.sink_k, new.sink_v = (keys[:, keep_sink], vals[:, keep_sink]) if bool(keep_sink.any()) else (None, None)
        new.win_k, new.win_v = (keys[:, keep_win], vals[:, keep_win]) if bool(keep_win.any()) else (None, None)
        return out

    def _segment(self, q, k, v, state, new):
        t0, L = state.tokens, q.shape[1]
        S = self.segment_length
        dev = q.device
        n_open = 0 if state.seg_k is None else state.seg_k.shape[1]
        keys = torch.cat([state.seg_k, k], 1) if n_open else k
        vals = torch.cat([state.seg_v, v], 1) if n_open else v
        kabs = t0 - n_open + torch.arange(keys.shape[1], device=dev)
        qabs = t0 + torch.arange(L, device=dev)
        M = self.tail
        first = torch.clamp((qabs // S) * S - M, min=0)  # earliest key each query sees
        mask = (kabs[None, :] <= qabs[:, None]) & (kabs[None, :] >= first[:, None])
        if M:  # relative distances are what RoPE sees: absolute positions give them exactly
            out = self._sdpa(self.rotary(q, qabs), self.rotary(keys, kabs), vals, mask)
        else:
            out = self._sdpa(self.rotary(q, qabs % S), self.rotary(keys, kabs % S), vals, mask)
        end = t0 + L
        keep = kabs >= max(0, (end // S) * S - M)
        new.seg_k, new.seg_v = (keys[:, keep], vals[:, keep]) if bool(keep.any()) else (None, None)
        return out

    def _sdpa(self, q_BLhD, k_BKgD, v_BKgD, mask_LK):
        """Masked softmax attention (torch's fused kernel; GQA inside it)."""
        o = F.scaled_dot_product_attention(q_BLhD.transpose(1, 2), k_BKgD.transpose(1, 2), v_BKgD.transpose(1, 2),
                                           attn_mask=mask_LK, enable_gqa=self.hpg > 1)
        return o.transpose(1, 2)

    def _attend(self, q_BLhD, k_BKgD, v_BKgD, mask_LK, q_sink=None, sink_keys=None):
        """Softmax attention with a boolean mask; GQA by repeating each group's key."""
        hpg = self.hpg
        k = k_BKgD.repeat_interleave(hpg, dim=2)
        v = v_BKgD.repeat_interleave(hpg, dim=2)
        dtype = torch.promote_types(q_BLhD.dtype, torch.float32)
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = torch.einsum("blhd,bkhd->bhlk", q_BLhD.to(dtype), k.to(dtype)) * scale
        if q_sink is not None:
            s_sink = torch.einsum("blhd,bkhd->bhlk", q_sink.to(dtype), k.to(dtype)) * scale
            scores = torch.where(sink_keys[None, None, None, :], s_sink, scores)
        scores = scores.masked_fill(~mask_LK[None, None], float("-inf"))
        probs = torch.softmax(scores, -1)
        return torch.einsum("bhlk,bkhd->blhd", probs, v.to(dtype)).to(q_BLhD.dtype)
