"""The segment-level attention operator F_theta of docs/semantics.md, for one layer.

    (C_i, o_i) = F_theta(x_i, C_{i-1}, R_{i-1})

One call takes the (un-rotated) queries/keys/values of a run of new tokens plus the
cross-segment state before them (`LayerState`) and returns the attention output and the
new state. The run may start inside an open segment and may end inside one (prefill of a
prompt that is not a multiple of S); the one-pass training forward is simply a run over
the whole sequence from an empty state. Training and prefill therefore share every line
here, and a run of one token is exact too. Decode of one token per row, without gradient,
has its own entry points that reuse the same segment transition: `SegmentedAttention.decode`
and `SegmentedAttention.decode_rows` (megaseg.ops.decode).

Shape legend: B batch, L new tokens, N segments in the run, S segment length, Q query
positions per segment, K key positions, P prefix slots, H query heads, G KV groups,
D head dim.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops import decode as _decode
from megaseg.ops import kernels, stats
from megaseg.ops.decode import RowsState
from megaseg.ops.kernels import SegmentBatch
from megaseg.ops.retrieval import Retrieved, retrieve
from megaseg.ops.rope import Rotary
from megaseg.ops.state import LayerState


class SegmentedAttention(torch.nn.Module):
    """Segmented attention for one layer with a fixed per-KV-group access plan.

    modes: the layer's access mode per (local) KV group, e.g. ("local", "retrieval").
    heads_per_group: query heads sharing each KV head (GQA). Queries of group g are heads
        g*hpg .. (g+1)*hpg-1, as in Llama and megatron-core.
    """

    def __init__(
        self, modes, segment: SegmentConfig, rope: RopeConfig, head_dim: int, heads_per_group: int,
        kernel: str | None = None,
    ):
        super().__init__()
        if kernel is not None and kernel not in kernels.KERNELS:
            raise ValueError(f"kernel={kernel!r} is invalid: allowed {', '.join(kernels.KERNELS)}")
        self.kernel = kernel  # None: the process default (megaseg.ops.kernels.set_default)
        # Where this operator sits, for megaseg.ops.stats: set by the model that owns it.
        self.layer_index = 0
        self.group_offset = 0
        self.modes = tuple(modes)
        self.segment = segment
        self.head_dim = head_dim
        self.hpg = heads_per_group
        self.rotary = Rotary(rope, head_dim)
        self.groups = {m: [g for g, mm in enumerate(self.modes) if mm == m] for m in (LOCAL, RETRIEVAL, SEGMENT)}
        self._uses_tail = bool(self.groups[LOCAL]) and segment.tail_length > 0
        self._uses_retrieval = bool(self.groups[RETRIEVAL]) and segment.retrieval_length > 0
        for m, gs in self.groups.items():
            self.register_buffer(f"_{m}_groups", torch.tensor(gs, dtype=torch.long), persistent=False)
            heads = [g * heads_per_group + h for g in gs for h in range(heads_per_group)]
            self.register_buffer(f"_{m}_heads", torch.tensor(heads, dtype=torch.long), persistent=False)
        order = torch.cat([getattr(self, f"_{m}_groups") for m in (LOCAL, RETRIEVAL, SEGMENT)])
        self.register_buffer("_group_unpermute", torch.argsort(order), persistent=False)

    def extra_repr(self) -> str:
        return f"modes={self.modes}, {self.segment}"

    # ------------------------------------------------------------------------------------
    def forward(self, q_BLHD, k_BLGD, v_BLGD, state: LayerState | None = None, chunk=None):
        """Attend a run of new tokens. Returns (output [B, L, H, D], new LayerState).

        With ``chunk`` (a `megaseg.parallel.context.SequenceChunk`) the run is this rank's
        segment-aligned chunk of whole sequences under context parallelism; see
        `_forward_chunk`. It returns no state (None).
        """
        if chunk is not None:
            if state is not None:
                raise ValueError("a context-parallel chunk starts from the state its neighbours send, not from a LayerState")
            return self._forward_chunk(q_BLHD, k_BLGD, v_BLGD, chunk)
        state = state or LayerState()
        j = self._check_call(q_BLHD, k_BLGD, state)
        S = self.segment.segment_length
        L = q_BLHD.shape[1]
        # Keys/values of the run, aligned so that segment boundaries fall at multiples of S.
        k_all = torch.cat([state.open_k, k_BLGD], 1) if j else k_BLGD
        v_all = torch.cat([state.open_v, v_BLGD], 1) if j else v_BLGD
        total = j + L
        closed = total // S  # segments that close in this run
        n_seg = -(-total // S)

        # R for relative segments 1..closed (boundaries inside the run), batched.
        ret = self._retrieve_run(q_BLHD, k_all, v_all, state, j, closed) if self._uses_retrieval else None
        pre_k, pre_v, pre_len = self._prefixes(k_all, v_all, state, n_seg, ret)
        out = self._attend_run(q_BLHD, k_all, v_all, pre_k, pre_v, pre_len, j, n_seg)
        return out, self._next_state(state, k_all, v_all, L, closed, ret)

    def _check_call(self, q_BLHD, k_BLGD, state: LayerState) -> int:
        """Check the heads against the plan and the state's open segment; returns j, the
        tokens already in the open segment."""
        H, G = q_BLHD.shape[2], k_BLGD.shape[2]
        if G != len(self.modes) or H != G * self.hpg:
            raise ValueError(f"got {H} query heads / {G} KV groups, layer plan has {len(self.modes)} groups x {self.hpg}")
        j = state.tokens % self.segment.segment_length
        if j and (state.open_k is None or state.open_k.shape[1] != j):
            raise ValueError(f"state at token {state.tokens} must hold an open segment of {j} tokens")
        return j

    # ---- decode: one new token per row, no gradient (megaseg.ops.decode) -----------------
    def decode(self, q_B1HD, k_B1GD, v_B1GD, state: LayerState | None = None):
        """One new token per row, rows at one position: (output [B, 1, H, D], new LayerState).

        The same output and state as ``forward`` on the token, computed in preallocated
        buffers that ride on the state (`LayerState.cache`); the input state stays valid.
        Inference only: the buffers are written in place, so no input may require grad.
        """
        if q_B1HD.shape[1] != 1:
            raise ValueError(f"decode takes one new token per row, got {q_B1HD.shape[1]}; runs go through forward")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q_B1HD, k_B1GD, v_B1GD)):
            raise ValueError("decode is inference only (it writes its buffers in place): "
                             "run it under torch.no_grad(), or call forward for gradients")
        state = state or LayerState()
        self._check_call(q_B1HD, k_B1GD, state)
        return _decode.step(self, q_B1HD, k_B1GD, v_B1GD, state)

    def rows_state(self, row_states, like: torch.Tensor) -> RowsState:
        """A `RowsState` of B rows from one batch-1 `LayerState` per row (any positions);
        ``like`` gives device and dtype."""
        return _decode.rows_state(self, row_states, like)

    def decode_rows(self, q_B1HD, k_B1GD, v_B1GD, rs: RowsState) -> torch.Tensor:
        """One new token per row, rows at any positions, in one batched step; updates ``rs``
        and returns the output [B, 1, H, D] (no gradient, as `decode`)."""
        return _decode.step_rows(self, q_B1HD, k_B1GD, v_B1GD, rs)

    def rows_row(self, rs: RowsState, b: int) -> LayerState:
        """Row b of ``rs`` as a batch-1 `LayerState`."""
        return _decode.rows_row(self, rs, b)

    # ------------------------------------------------------------------------------------
    def _forward_chunk(self, q_BLHD, k_BLGD, v_BLGD, chunk):
        """This rank's chunk of a sequence under context parallelism (docs/parallelism.md).

        The chunk starts on a segment boundary. What the operator would read from the
        state comes from the neighbours through ``chunk``: the previous rank's last tail
        (point-to-point) and the retrieved prefix of the first segment; the retrieval of
        every boundary inside the chunk is a distributed exact top-R over all ranks' tokens,
        so no rank holds the pool. How gradient crosses a segment boundary is the chunk's
        business (`SequenceChunk.cut_tails`): for TBPTT-K every carried tail is a leaf
        whose cotangent `SequenceChunk.backward` pushes back K times; untruncated, tails
        stay attached. Retrieval carries no gradient.
        """
        S, M, R = self.segment.segment_length, self.segment.tail_length, self.segment.retrieval_length
        B, L, H, D = q_BLHD.shape
        n_seg = -(-L // S)
        closed = L // S
        state = LayerState(tokens=chunk.start)
        my_tail = None
        cut = None
        if self._uses_tail:
            if closed == n_seg:  # the last segment is whole: a later rank reads its tail
                gidx = self._local_groups
                my_tail = torch.cat([k_BLGD[:, L - M :].index_select(2, gidx), v_BLGD[:, L - M :].index_select(2, gidx)], -1)
            received = chunk.exchange_tail(self.layer_index, my_tail, anchor=k_BLGD,
                                           shape=(M, len(self.groups[LOCAL]), 2 * D))
            if received is not None:
                state.tail_k, state.tail_v = received[..., :D], received[..., D:]
            cut = lambda body_k, body_v: chunk.cut_tails(self.layer_index, body_k, body_v)  # noqa: E731
        ret = None
        if self._uses_retrieval:
            gidx = self._retrieval_groups
            ends = torch.arange(1, closed + 1, device=q_BLHD.device) * S - 1
            q_end = q_BLHD.index_select(1, ends).index_select(2, self._retrieval_heads)
            q_end = q_end.reshape(B, closed, len(self.groups[RETRIEVAL]), self.hpg, D)
            keys, values, count, first = chunk.retrieve(
                self.layer_index, q_end, k_BLGD.index_select(2, gidx).detach(),
                v_BLGD.index_select(2, gidx).detach(), R, self.segment.retrieval_group_reduce)
            ret = Retrieved(keys=keys, values=values, count=count, pool_k=None, pool_v=None)
            if first is not None:
                state.ret_k, state.ret_v = first
        pre_k, pre_v, pre_len = self._prefixes(k_BLGD, v_BLGD, state, n_seg, ret, cut=cut)
        out = self._attend_run(q_BLHD, k_BLGD, v_BLGD, pre_k, pre_v, pre_len, 0, n_seg)
        if my_tail is not None:
            out = chunk.link_tail(self.layer_index, my_tail, out)
        return out, None

    def _retrieve_run(self, q_BLHD, k_all, v_all, state, j, closed) -> Retrieved | None:
        """Retrieved prefixes for the segments following each boundary closed in this run."""
        if closed == 0:
            return None
        S, R = self.segment.segment_length, self.segment.retrieval_length
        gidx = self._retrieval_groups
        B, _, _, D = q_BLHD.shape
        # Segment-end queries: last token of each closed segment (index in the run's queries).
        ends = torch.arange(1, closed + 1, device=q_BLHD.device) * S - 1 - j
        q_end = q_BLHD.index_select(1, ends).index_select(2, self._retrieval_heads)
        q_end_BCGHD = q_end.reshape(B, closed, len(self.groups[RETRIEVAL]), self.hpg, D)
        new_k = k_all[:, : closed * S].index_select(2, gidx).detach()
        new_v = v_all[:, : closed * S].index_select(2, gidx).detach()
        pool_k = torch.cat([state.pool_k, new_k], 1) if state.pool_k is not None else new_k
        pool_v = torch.cat([state.pool_v, new_v], 1) if state.pool_v is not None else new_v
        before = state.pool_k.shape[1] if state.pool_k is not None else 0
        valid_len = before + torch.arange(1, closed + 1, device=q_BLHD.device) * S
        rec = stats.active()
        found = retrieve(q_end_BCGHD, pool_k, pool_v, valid_len, R, self.segment.retrieval_group_reduce,
                         details=rec is not None)
        keys, values, count = found[:3]
        if rec is not None:
            rec.add_retrieval(self.layer_index, [self.group_offset + g for g in self.groups[RETRIEVAL]], found[3],
                              count, torch.div(valid_len, S, rounding_mode="floor"), found[4], S)
        return Retrieved(keys=keys, values=values, count=count, pool_k=pool_k, pool_v=pool_v)

    def _mode_prefix(self, mode, k_all, v_all, state, n_seg, ret, cut=None):
        """One mode's prefix: (first segment's KV or None, later segments' KV [B, N-1, P', g, D]
        or None, valid lengths [N]). The first segment of the run uses the state's prefix.
        ``cut(body_k, body_v)`` replaces the tails carried inside the run (context-parallel
        TBPTT: leaves, so gradient crosses a boundary only when pushed)."""
        S, M = self.segment.segment_length, self.segment.tail_length
        B, _, _, D = k_all.shape
        dev = k_all.device
        body = body_v = None
        rest_len = torch.zeros(0, dtype=torch.long, device=dev)
        if mode == LOCAL:
            first_k, first_v = state.tail_k, state.tail_v
            if n_seg > 1:
                # Tail of relative segment r-1 for r = 1..n_seg-1: its last M tokens.
                gidx = self._local_groups
                body = k_all[:, : (n_seg - 1) * S].reshape(B, n_seg - 1, S, -1, D)[:, :, S - M :].index_select(3, gidx)
                body_v = v_all[:, : (n_seg - 1) * S].reshape(B, n_seg - 1, S, -1, D)[:, :, S - M :].index_select(3, gidx)
                if cut is not None:
                    body, body_v = cut(body, body_v)
                rest_len = torch.full((n_seg - 1,), M, dtype=torch.long, device=dev)
        else:
            first_k, first_v = state.ret_k, state.ret_v
            if n_seg > 1:
                body, body_v, rest_len = ret.keys[:, : n_seg - 1], ret.values[:, : n_seg - 1], ret.count[: n_seg - 1]
        first_len = 0 if first_k is None else first_k.shape[1]
        lens = torch.cat([torch.tensor([first_len], device=dev), rest_len])
        return first_k, first_v, body, body_v, lens

    def _prefixes(self, k_all, v_all, state, n_seg, ret, cut=None):
        """Prefix KV [B, N, P, G, D] of every segment of the run and group of the layer (None
        when no segment has one), and the valid lengths [N, G]. Local groups hold the
        carried tail, retrieval groups the retrieved tokens, segment groups nothing."""
        B, _, G, D = k_all.shape
        dev = k_all.device
        used = [m for m, on in ((LOCAL, self._uses_tail), (RETRIEVAL, self._uses_retrieval)) if on]
        parts = {m: self._mode_prefix(m, k_all, v_all, state, n_seg, ret, cut if m == LOCAL else None) for m in used}
        width = 0
        for first_k, _, body, _, _ in parts.values():
            width = max(width, 0 if first_k is None else first_k.shape[1], 0 if body is None else body.shape[2])
        lens = torch.zeros(n_seg, G, dtype=torch.long, device=dev)
        for m, (_, _, _, _, mode_len) in parts.items():
            lens[:, getattr(self, f"_{m}_groups")] = mode_len[:, None]
        if width == 0:
            return None, None, lens
        keys, values = [], []
        for m in (LOCAL, RETRIEVAL, SEGMENT):
            g = len(self.groups[m])
            if not g:
                continue
            if m not in parts:
                keys.append(k_all.new_zeros(B, n_seg, width, g, D))
                values.append(v_all.new_zeros(B, n_seg, width, g, D))
                continue
            first_k, first_v, body, body_v, _ = parts[m]
            first_k = _pad_dim(first_k, 1, width) if first_k is not None else k_all.new_zeros(B, width, g, D)
            first_v = _pad_dim(first_v, 1, width) if first_v is not None else v_all.new_zeros(B, width, g, D)
            pk, pv = [first_k.unsqueeze(1)], [first_v.unsqueeze(1)]
            if n_seg > 1:
                pk.append(_pad_dim(body, 2, width))
                pv.append(_pad_dim(body_v, 2, width))
            keys.append(torch.cat(pk, 1) if len(pk) > 1 else pk[0])
            values.append(torch.cat(pv, 1) if len(pv) > 1 else pv[0])
        if len(keys) == 1:
            return keys[0], values[0], lens
        return (
            torch.cat(keys, 3).index_select(3, self._group_unpermute),
            torch.cat(values, 3).index_select(3, self._group_unpermute),
            lens,
        )

    def _attend_run(self, q, k, v, pre_k, pre_v, pre_len, j, n_seg):
        """Output [B, L, H, D] of the run: at most two kernel calls, each over all groups."""
        S = self.segment.segment_length
        B, L, H, D = q.shape
        total = j + L
        pieces = []
        # The open segment continued at offset j (when the run starts inside it).
        first_full = 0
        if j:
            lk = min(S, total)
            batch = SegmentBatch(
                q=q[:, : lk - j].unsqueeze(1), k=k[:, :lk].unsqueeze(1), v=v[:, :lk].unsqueeze(1),
                prefix_k=None if pre_k is None else pre_k[:, :1], prefix_v=None if pre_v is None else pre_v[:, :1],
                prefix_len=pre_len[:1], q_offset=j,
            )
            pieces.append(kernels.attend(batch, self.rotary, self.kernel))
            first_full = 1
        if n_seg > first_full:
            # Whole segments, batched; with several, the last is padded to S (pads are
            # never attended). A lone short segment runs at its own length.
            start = first_full * S
            n = n_seg - first_full
            width = S if n > 1 else total - start
            pad = n * width - (total - start)
            qs, ks, vs = q[:, start - j :], k[:, start:], v[:, start:]
            if pad:
                qs, ks, vs = (_pad_dim(t, 1, t.shape[1] + pad) for t in (qs, ks, vs))
            batch = SegmentBatch(
                q=qs.reshape(B, n, width, H, D), k=ks.reshape(B, n, width, -1, D), v=vs.reshape(B, n, width, -1, D),
                prefix_k=None if pre_k is None else pre_k[:, first_full:],
                prefix_v=None if pre_v is None else pre_v[:, first_full:],
                prefix_len=pre_len[first_full:], q_offset=0,
            )
            o = kernels.attend(batch, self.rotary, self.kernel)
            pieces.append(o.reshape(B, n * width, H, D)[:, : n * width - pad])
            if stats.active() is not None:
                self._record_mass(stats.active(), batch, total - start)
        return torch.cat([p.reshape(B, -1, H, D) for p in pieces], 1) if len(pieces) > 1 else pieces[0].reshape(B, L, H, D)

    @torch.no_grad()
    def _record_mass(self, rec, batch: SegmentBatch, real_tokens: int) -> None:
        """Attention mass on the prefix and on the segment, per access mode: the kernel run
        once more with indicator values (prefix values e_0, segment values e_1)."""
        B, N, Q, H, D = batch.q.shape
        seg_v = torch.zeros_like(batch.v)
        seg_v[..., 1] = 1
        pre_v = None
        if batch.prefix_v is not None:
            pre_v = torch.zeros_like(batch.prefix_v)
            pre_v[..., 0] = 1
        shares = kernels.attend(replace(batch, v=seg_v, prefix_v=pre_v), self.rotary, "sdpa").float()
        valid_NQ = (torch.arange(N * Q, device=shares.device) < real_tokens).reshape(N, Q)
        for mode in (LOCAL, RETRIEVAL, SEGMENT):
            groups = self.groups[mode]
            if not groups:
                continue
            heads = getattr(self, f"_{mode}_heads")
            with_prefix_N = batch.prefix_len[:, groups[0]] > 0
            keep_NQ = valid_NQ & (with_prefix_N[:, None] if mode != SEGMENT else True)
            if not bool(keep_NQ.any()):
                continue
            part = shares.index_select(3, heads)[:, keep_NQ]  # [B, kept queries, heads, D]
            rec.add_mass(self.layer_index, mode, part[..., 0], part[..., 1])

    def _next_state(self, state, k_all, v_all, L, closed, ret):
        S, M = self.segment.segment_length, self.segment.tail_length
        new = LayerState(tokens=state.tokens + L)
        rem = k_all.shape[1] - closed * S
        if rem:
            new.open_k, new.open_v = k_all[:, closed * S :], v_all[:, closed * S :]
        if closed == 0:
            new.tail_k, new.tail_v = state.tail_k, state.tail_v
            new.ret_k, new.ret_v = state.ret_k, state.ret_v
            new.pool_k, new.pool_v = state.pool_k, state.pool_v
            return new
        if self._uses_tail:
            last = slice((closed - 1) * S + S - M, closed * S)
            new.tail_k = k_all[:, last].index_select(2, self._local_groups)
            new.tail_v = v_all[:, last].index_select(2, self._local_groups)
        if ret is not None:
            c = int(ret.count[-1])
            new.ret_k, new.ret_v = ret.keys[:, -1, :c], ret.values[:, -1, :c]
            new.pool_k, new.pool_v = ret.pool_k, ret.pool_v
        return new


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)
