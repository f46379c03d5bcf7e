"""Decode of the segmented operator: one new token per row, no gradient, in preallocated buffers.

`SegmentedAttention.forward` attends a run of tokens of any length (training, prefill, and
one token too: exact, only slower). Decode is a separate entry point that its caller asks
for on purpose:

* `SegmentedAttention.decode` (`step`): rows at one position, a batched `LayerState`; the
  open segment's buffers ride on the state as its `DecodeCache`.
* `SegmentedAttention.decode_rows` (`step_rows`): rows at any positions in one `RowsState`
  (per-row positions and masks in one set of buffers); `rows_state` builds it from
  batch-1 `LayerState`s and `rows_row` gives them back.

Through a model, the owner of the inference state (`megaseg.inference.engine`) opts in by
handing each layer a `DecodeStep` (`TokenStep`, `RowsStep`) in place of its state; the
model's attention calls `DecodeStep.attend` with the layer's operator instead of the
operator's forward.

Every position inside a segment is fixed (prefix slot p at p, segment token t at P + t),
so a key is rotated once, when its token enters, and written into the buffers; the prefix
is rotated once per segment. A step rotates one query and one key per row and runs one
torch ``scaled_dot_product_attention`` call per layer over the buffers (the query heads of
a KV group act as that group's queries: no GQA expansion), on any device; decode does not
cross the kernel boundary (`megaseg.ops.kernels`). A token that fills its segment closes
it exactly as a run does (tail, pool, retrieval), through the operator's own transition.

``op`` below is the layer's `SegmentedAttention`.

Shape legend: B batch (rows), S segment length, P / W prefix slots, H query heads, G KV
groups, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from megaseg.ops.rope import _rotate_half
from megaseg.ops.state import LayerState


@dataclass
class DecodeCache:
    """Preallocated buffers of one layer's open segment for token-by-token decode.

    k_open/v_open: [B, S, G, D] un-rotated KV of the open segment (the state's open_k/open_v
                   are views of their first j tokens).
    k_rot/v:       [B, G, P + S, D] rotated keys and values in attention layout: prefix slot
                   p at p (valid below the group's prefix length), segment token t at P + t.
    cos/sin:       [G, S, D] rotary tables of segment token t in group g.
    bias:          [G, 1, P + S] additive mask of the invalid prefix slots, or None.
    width:         P, the prefix slots.
    filled:        open-segment tokens written so far (by the latest state that wrote).
    prefix:        the (tail_k, ret_k) the prefix was built from.
    """

    k_open: torch.Tensor
    v_open: torch.Tensor
    k_rot: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor | None
    width: int
    filled: int
    prefix: tuple


@dataclass
class RowsState:
    """Decode state of one layer for B rows at any positions (`SegmentedAttention.decode_rows`).

    tokens:        [B] tokens processed per row.
    k_open/v_open: [B, S, G, D] un-rotated KV of each row's open segment (first j_b valid).
    k_rot/v:       [B, G, W + S, D] rotated keys and values: prefix slot p at p, segment
                   token t at W + t (W = max(M, R) of the layer, fixed).
    pre_len:       [B, G] valid prefix slots per row and group.
    pre_bias:      [B, G, 1, W] additive mask of the invalid prefix slots.
    closed:        per row, a batch-1 `LayerState` of everything but the open segment
                   (tail, retrieved prefix, pool); touched only when the row's segment closes.
    """

    tokens: list
    k_open: torch.Tensor
    v_open: torch.Tensor
    k_rot: torch.Tensor
    v: torch.Tensor
    pre_len: torch.Tensor
    pre_bias: torch.Tensor
    width: int
    closed: list


# ---- what a model hands its attention for a decode step -----------------------------------
class DecodeStep:
    """A layer's state for one decode step through a model: the model's attention calls
    ``attend(core, q [B, 1, H, D], k [B, 1, G, D], v)`` -> (output [B, 1, H, D], the step
    object for the next call) instead of ``core(q, k, v, state)``."""

    def attend(self, core, q_B1HD, k_B1GD, v_B1GD):
        raise NotImplementedError


class TokenStep(DecodeStep):
    """Rows at one position: ``state`` (a batched `LayerState`) goes through
    `SegmentedAttention.decode` and is replaced by the state after the token."""

    def __init__(self, state: LayerState | None):
        self.state = state

    def attend(self, core, q_B1HD, k_B1GD, v_B1GD):
        out, self.state = core.decode(q_B1HD, k_B1GD, v_B1GD, self.state)
        return out, self


class RowsStep(DecodeStep):
    """Rows at different positions: one batched `SegmentedAttention.decode_rows` step over
    ``rows`` (a `RowsState`, updated in place)."""

    def __init__(self, rows: RowsState):
        self.rows = rows

    def attend(self, core, q_B1HD, k_B1GD, v_B1GD):
        return core.decode_rows(q_B1HD, k_B1GD, v_B1GD, self.rows), self


# ---- rows at one position ------------------------------------------------------------------
def step(op, q_B1HD, k_B1GD, v_B1GD, state: LayerState) -> tuple[torch.Tensor, LayerState]:
    """One new token of the open segment for rows at one position, with the state's
    `DecodeCache` (built when the state has none that matches it). Returns (output
    [B, 1, H, D], the state after the token); the input state stays valid."""
    S = op.segment.segment_length
    j = state.tokens % S
    cache = state.cache if j and _cache_matches(state, j) else None
    if cache is None:
        cache = _new_cache(op, state, j, k_B1GD)
    B, _, H, D = q_B1HD.shape
    G = k_B1GD.shape[2]
    cos, sin = cache.cos[:, j], cache.sin[:, j]  # [G, D] at position prefix_len[g] + j
    k1, v1 = k_B1GD[:, 0], v_B1GD[:, 0]  # [B, G, D]
    q1 = q_B1HD[:, 0].reshape(B, G, op.hpg, D)
    slot = cache.width + j
    cache.k_open[:, j] = k1
    cache.v_open[:, j] = v1
    cache.k_rot[:, :, slot] = k1 * cos + _rotate_half(k1) * sin
    cache.v[:, :, slot] = v1
    cache.filled = j + 1
    q_rot = q1 * cos[:, None] + _rotate_half(q1) * sin[:, None]
    mask = None if cache.bias is None else cache.bias[:, :, : slot + 1]
    o = F.scaled_dot_product_attention(q_rot, cache.k_rot[:, :, : slot + 1], cache.v[:, :, : slot + 1], attn_mask=mask)
    out = o.reshape(B, 1, H, D)
    if j + 1 < S:
        new = replace(state, tokens=state.tokens + 1, open_k=cache.k_open[:, : j + 1],
                      open_v=cache.v_open[:, : j + 1], cache=cache)
        return out, new
    return out, _close_segment(op, q_B1HD, cache.k_open, cache.v_open, state, state.tokens + 1)


def _new_cache(op, state: LayerState, j: int, like: torch.Tensor) -> DecodeCache:
    """A `DecodeCache` for the open segment of ``state`` (``j`` tokens in it so far)."""
    S = op.segment.segment_length
    B, _, G, D = like.shape
    dev, dtype = like.device, like.dtype
    pre_len = torch.zeros(G, dtype=torch.long, device=dev)
    parts = []
    if op._uses_tail and state.tail_k is not None:
        parts.append((op._local_groups, state.tail_k, state.tail_v))
    if op._uses_retrieval and state.ret_k is not None:
        parts.append((op._retrieval_groups, state.ret_k, state.ret_v))
    width = max((pk.shape[1] for _, pk, _ in parts), default=0)
    k_rot = torch.zeros(B, G, width + S, D, device=dev, dtype=dtype)
    v = torch.zeros(B, G, width + S, D, device=dev, dtype=dtype)
    pos = torch.arange(width + S, device=dev)
    for gidx, pk, pv in parts:
        n = pk.shape[1]
        pre_len[gidx] = n
        k_rot[:, gidx, :n] = op.rotary(pk.to(dtype), pos[:n]).transpose(1, 2)
        v[:, gidx, :n] = pv.to(dtype).transpose(1, 2)
    # cos/sin [G, S, D] of segment token t in group g: position prefix_len[g] + t.
    tab_cos, tab_sin = op.rotary.tables(width + S, dev, dtype)
    seg_pos = pre_len[:, None] + pos[:S]
    cos, sin = tab_cos[seg_pos], tab_sin[seg_pos]
    k_open = torch.empty(B, S, G, D, device=dev, dtype=dtype)
    v_open = torch.empty(B, S, G, D, device=dev, dtype=dtype)
    if j:
        k_open[:, :j] = state.open_k
        v_open[:, :j] = state.open_v
        ok = state.open_k.to(dtype).transpose(1, 2)  # [B, G, j, D]
        k_rot[:, :, width : width + j] = ok * cos[:, :j] + _rotate_half(ok) * sin[:, :j]
        v[:, :, width : width + j] = state.open_v.to(dtype).transpose(1, 2)
    bias = None
    if width and bool((pre_len < width).any()):
        bias = torch.zeros(G, 1, width + S, device=dev, dtype=dtype)
        bias[:, 0, :width].masked_fill_(pos[:width][None, :] >= pre_len[:, None], float("-inf"))
    return DecodeCache(k_open=k_open, v_open=v_open, k_rot=k_rot, v=v, cos=cos, sin=sin, bias=bias,
                       width=width, filled=j, prefix=(state.tail_k, state.ret_k))


def _cache_matches(state: LayerState, j: int) -> bool:
    """Whether ``state.cache`` holds exactly this state's open segment and prefix: its
    open KV are views of the cache's buffers, nobody wrote past them (a second decode
    from the same state starts a new cache) and the prefix is the one it was built from."""
    c = state.cache
    return (
        c is not None
        and c.filled == j
        and state.open_k.data_ptr() == c.k_open.data_ptr()
        and state.open_k.shape[0] == c.k_open.shape[0]
        and state.open_k.dtype == c.k_open.dtype
        and c.prefix[0] is state.tail_k
        and c.prefix[1] is state.ret_k
    )


def _close_segment(op, q_B1HD, k_BSGD, v_BSGD, before: LayerState, tokens: int) -> LayerState:
    """The state at ``tokens`` after the open segment (the KV of all its S tokens) closes
    with the token whose query is ``q_B1HD``: the operator's transition of a run that ends
    on the boundary (tail, pool, retrieval). ``before``: the state before the segment (its
    open part is not read)."""
    S = op.segment.segment_length
    ret = op._retrieve_run(q_B1HD, k_BSGD, v_BSGD, before, S - 1, 1) if op._uses_retrieval else None
    return op._next_state(replace(before, tokens=tokens - S), k_BSGD, v_BSGD, S, 1, ret)


# ---- rows at different positions -----------------------------------------------------------
def rows_state(op, row_states, like: torch.Tensor) -> RowsState:
    """A `RowsState` of B rows from one batch-1 `LayerState` per row (any positions);
    ``like`` gives device and dtype."""
    S = op.segment.segment_length
    B, G, D = len(row_states), len(op.modes), op.head_dim
    W = max(op.segment.tail_length if op._uses_tail else 0,
            op.segment.retrieval_length if op._uses_retrieval else 0)
    dev, dtype = like.device, like.dtype
    rs = RowsState(
        tokens=[st.tokens for st in row_states],
        k_open=torch.zeros(B, S, G, D, device=dev, dtype=dtype), v_open=torch.zeros(B, S, G, D, device=dev, dtype=dtype),
        k_rot=torch.zeros(B, G, W + S, D, device=dev, dtype=dtype), v=torch.zeros(B, G, W + S, D, device=dev, dtype=dtype),
        pre_len=torch.zeros(B, G, dtype=torch.long, device=dev),
        pre_bias=torch.zeros(B, G, 1, W, device=dev, dtype=dtype), width=W,
        closed=[replace(st, open_k=None, open_v=None, cache=None) for st in row_states],
    )
    for b, st in enumerate(row_states):
        _rows_set_prefix(op, rs, b)
        j = st.tokens % S
        if j:
            rs.k_open[b, :j] = st.open_k[0]
            rs.v_open[b, :j] = st.open_v[0]
            pos = rs.pre_len[b][:, None] + torch.arange(j, device=dev)  # [G, j]
            cos, sin = op.rotary.tables(W + S, dev, dtype)
            ok = st.open_k[0].to(dtype).transpose(0, 1)  # [G, j, D]
            rs.k_rot[b, :, W : W + j] = ok * cos[pos] + _rotate_half(ok) * sin[pos]
            rs.v[b, :, W : W + j] = st.open_v[0].to(dtype).transpose(0, 1)
    return rs


def _rows_set_prefix(op, rs: RowsState, b: int) -> None:
    """Write row b's prefix (from its closed-segment state) into the buffers, rotated."""
    st = rs.closed[b]
    W = rs.width
    rs.k_rot[b, :, :W] = 0
    rs.v[b, :, :W] = 0
    rs.pre_len[b] = 0
    pos = torch.arange(W, device=rs.k_rot.device)
    for on, gidx, pk, pv in ((op._uses_tail, op._local_groups, st.tail_k, st.tail_v),
                             (op._uses_retrieval, op._retrieval_groups, st.ret_k, st.ret_v)):
        if on and pk is not None:
            n = pk.shape[1]
            rs.pre_len[b, gidx] = n
            rs.k_rot[b, gidx, :n] = op.rotary(pk[0].to(rs.k_rot.dtype), pos[:n]).transpose(0, 1)
            rs.v[b, gidx, :n] = pv[0].to(rs.v.dtype).transpose(0, 1)
    rs.pre_bias[b] = 0
    rs.pre_bias[b, :, 0].masked_fill_(pos[None, :] >= rs.pre_len[b][:, None], float("-inf"))


def step_rows(op, q_B1HD, k_B1GD, v_B1GD, rs: RowsState) -> torch.Tensor:
    """One new token per row, rows at any positions, in one batched step; updates ``rs``.

    Row b's token sits at offset j_b of its open segment and is rotated at
    prefix_len[b, g] + j_b; each row's keys are masked to its own valid prefix and
    segment. Rows whose segment fills close it (tail, pool, retrieval) one by one,
    which happens once per S steps of a row. Returns the output [B, 1, H, D].
    """
    S, W = op.segment.segment_length, rs.width
    B, _, H, D = q_B1HD.shape
    G = k_B1GD.shape[2]
    dev = q_B1HD.device
    js = [t % S for t in rs.tokens]
    j = torch.tensor(js, device=dev)
    cos_t, sin_t = op.rotary.tables(W + S, dev, rs.k_rot.dtype)
    pos = rs.pre_len + j[:, None]  # [B, G]
    cos, sin = cos_t[pos], sin_t[pos]  # [B, G, D]
    k1, v1 = k_B1GD[:, 0], v_B1GD[:, 0]
    q1 = q_B1HD[:, 0].reshape(B, G, op.hpg, D)
    rows = torch.arange(B, device=dev)
    rs.k_open[rows, j] = k1
    rs.v_open[rows, j] = v1
    rs.k_rot[rows, :, W + j] = k1 * cos + _rotate_half(k1) * sin
    rs.v[rows, :, W + j] = v1
    q_rot = q1 * cos[:, :, None] + _rotate_half(q1) * sin[:, :, None]
    n = max(js) + 1
    seg_ok = torch.arange(n, device=dev)[None, :] <= j[:, None]  # [B, n]
    seg_bias = torch.zeros(B, n, device=dev, dtype=rs.k_rot.dtype).masked_fill_(~seg_ok, float("-inf"))
    mask = torch.cat([rs.pre_bias, seg_bias[:, None, None, :].expand(B, G, 1, n)], 3)
    o = F.scaled_dot_product_attention(q_rot, rs.k_rot[:, :, : W + n], rs.v[:, :, : W + n], attn_mask=mask)
    for b in range(B):
        rs.tokens[b] += 1
        if js[b] + 1 == S:  # the row's segment is full: close it, then write its new prefix
            rs.closed[b] = _close_segment(op, q_B1HD[b : b + 1], rs.k_open[b : b + 1], rs.v_open[b : b + 1],
                                          rs.closed[b], rs.tokens[b])
            _rows_set_prefix(op, rs, b)
    return o.reshape(B, 1, H, D)


def rows_row(op, rs: RowsState, b: int) -> LayerState:
    """Row b of ``rs`` as a batch-1 `LayerState`."""
    j = rs.tokens[b] % op.segment.segment_length
    st = replace(rs.closed[b], tokens=rs.tokens[b])
    if j:
        st.open_k, st.open_v = rs.k_open[b : b + 1, :j].clone(), rs.v_open[b : b + 1, :j].clone()
    return st
