"""The segment-level attention operator F_theta of docs/semantics.md, for one layer.

    (C_i, o_i) = F_theta(x_i, C_{i-1}, R_{i-1})

One call takes the (un-rotated) queries/keys/values of a run of new tokens plus the
cross-segment state before them and returns the attention output and the new state. The
run may start inside an open segment (decode) and may end inside one (prefill of a prompt
that is not a multiple of S); the one-pass training forward is simply a run over the whole
sequence from an empty state. Training, prefill and decode therefore share every line here.

Shape legend: B batch, L new tokens, N segments in the run, S segment length, Q query
positions per segment, K key positions, P prefix slots, H query heads, G KV groups,
D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops import kernels, stats
from megaseg.ops.kernels import SegmentBatch
from megaseg.ops.retrieval import retrieve
from megaseg.ops.rope import Rotary, _rotate_half


@dataclass
class LayerState:
    """Cross-segment state of one layer; nothing else crosses a segment boundary.

    tokens:          tokens processed so far; the open segment holds tokens % S of them.
    open_k/open_v:   [B, j, G, D] un-rotated KV of the open segment's tokens (all groups).
    tail_k/tail_v:   [B, m, G_local, D] C_{i-1}: last M KV of the previous segment, local
                     groups only; carries gradient in training.
    ret_k/ret_v:     [B, r, G_ret, D] R_{i-1}: retrieved prefix of the current segment (detached).
    pool_k/pool_v:   [B, T_closed, G_ret, D] retrieval-group KV of all closed segments (detached).
    cache:           decode buffers of the open segment (`DecodeCache`), or None. Derived
                     from the fields above and rebuilt from them whenever it does not match
                     them, so code that builds, selects or concatenates states may drop it.
    """

    tokens: int = 0
    open_k: torch.Tensor | None = None
    open_v: torch.Tensor | None = None
    tail_k: torch.Tensor | None = None
    tail_v: torch.Tensor | None = None
    ret_k: torch.Tensor | None = None
    ret_v: torch.Tensor | None = None
    pool_k: torch.Tensor | None = None
    pool_v: torch.Tensor | None = None
    cache: "DecodeCache | None" = field(default=None, repr=False, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def detached(self) -> "LayerState":
        return replace(self, **{k: v.detach() for k, v in self.tensors().items()})


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
        S = self.segment.segment_length
        B, L, H, D = q_BLHD.shape
        G = k_BLGD.shape[2]
        if G != len(self.modes) or H != G * self.hpg:
            raise ValueError(f"got {H} query heads / {G} KV groups, layer plan has {len(self.modes)} groups x {self.hpg}")
        j = state.tokens % S
        if j and (state.open_k is None or state.open_k.shape[1] != j):
            raise ValueError(f"state at token {state.tokens} must hold an open segment of {j} tokens")
        if L == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BLHD, k_BLGD, v_BLGD))):
            return self._decode_step(q_BLHD, k_BLGD, v_BLGD, state, j)

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

    # ---- decode: one token, no gradient ------------------------------------------------
    def _decode_step(self, q_BLHD, k_BLGD, v_BLGD, state, j):
        """One new token of the open segment (decode), with the layer's `DecodeCache`.

        Every position inside a segment is fixed (prefix 0..P-1, segment token t at
        P + t), so a key is rotated once, when its token enters, and written into
        preallocated buffers; the prefix is rotated once per segment. A step rotates one
        query and one key and runs one attention call over the buffers (query heads of a
        KV group act as that group's queries: no GQA expansion). When the token fills the
        segment it closes exactly as in a run (tail, pool, retrieval), from the buffers.
        """
        S = self.segment.segment_length
        cache = state.cache if j and _cache_matches(state, j) else None
        if cache is None:
            cache = self._decode_cache(state, j, k_BLGD)
        B, _, H, D = q_BLHD.shape
        G = k_BLGD.shape[2]
        cos, sin = cache.cos[:, j], cache.sin[:, j]  # [G, D] at position prefix_len[g] + j
        k1, v1 = k_BLGD[:, 0], v_BLGD[:, 0]  # [B, G, D]
        q1 = q_BLHD[:, 0].reshape(B, G, self.hpg, D)
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
        # The segment closes: the same transition as a run that ends on a boundary.
        k_all, v_all = cache.k_open, cache.v_open
        ret = self._retrieve_run(q_BLHD, k_all, v_all, state, j, 1) if self._uses_retrieval else None
        return out, self._next_state(state, k_all, v_all, 1, 1, ret)

    def _decode_cache(self, state, j, like):
        """A `DecodeCache` for the open segment of ``state`` (``j`` tokens in it so far)."""
        S = self.segment.segment_length
        B, _, G, D = like.shape
        dev, dtype = like.device, like.dtype
        pre_len = torch.zeros(G, dtype=torch.long, device=dev)
        parts = []
        if self._uses_tail and state.tail_k is not None:
            parts.append((self._local_groups, state.tail_k, state.tail_v))
        if self._uses_retrieval and state.ret_k is not None:
            parts.append((self._retrieval_groups, state.ret_k, state.ret_v))
        width = max((pk.shape[1] for _, pk, _ in parts), default=0)
        k_rot = torch.zeros(B, G, width + S, D, device=dev, dtype=dtype)
        v = torch.zeros(B, G, width + S, D, device=dev, dtype=dtype)
        pos = torch.arange(width + S, device=dev)
        for gidx, pk, pv in parts:
            n = pk.shape[1]
            pre_len[gidx] = n
            k_rot[:, gidx, :n] = self.rotary(pk.to(dtype), pos[:n]).transpose(1, 2)
            v[:, gidx, :n] = pv.to(dtype).transpose(1, 2)
        # cos/sin [G, S, D] of segment token t in group g: position prefix_len[g] + t.
        tab_cos, tab_sin = self.rotary.tables(width + S, dev, dtype)
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

    # ---- decode of rows at different positions ------------------------------------------
    def rows_state(self, row_states, like: torch.Tensor) -> "RowsState":
        """A `RowsState` of B rows from one batch-1 `LayerState` per row (any positions);
        ``like`` gives device and dtype."""
        S = self.segment.segment_length
        B, G, D = len(row_states), len(self.modes), self.head_dim
        W = max(self.segment.tail_length if self._uses_tail else 0,
                self.segment.retrieval_length if self._uses_retrieval else 0)
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
            self._rows_set_prefix(rs, b)
            j = st.tokens % S
            if j:
                rs.k_open[b, :j] = st.open_k[0]
                rs.v_open[b, :j] = st.open_v[0]
                pos = rs.pre_len[b][:, None] + torch.arange(j, device=dev)  # [G, j]
                cos, sin = self.rotary.tables(W + S, dev, dtype)
                ok = st.open_k[0].to(dtype).transpose(0, 1)  # [G, j, D]
                rs.k_rot[b, :, W : W + j] = ok * cos[pos] + _rotate_half(ok) * sin[pos]
                rs.v[b, :, W : W + j] = st.open_v[0].to(dtype).transpose(0, 1)
        return rs

    def _rows_set_prefix(self, rs: "RowsState", b: int) -> None:
        """Write row b's prefix (from its closed-segment state) into the buffers, rotated."""
        st = rs.closed[b]
        W = rs.width
        rs.k_rot[b, :, :W] = 0
        rs.v[b, :, :W] = 0
        rs.pre_len[b] = 0
        pos = torch.arange(W, device=rs.k_rot.device)
        for on, gidx, pk, pv in ((self._uses_tail, self._local_groups, st.tail_k, st.tail_v),
                                 (self._uses_retrieval, self._retrieval_groups, st.ret_k, st.ret_v)):
            if on and pk is not None:
                n = pk.shape[1]
                rs.pre_len[b, gidx] = n
                rs.k_rot[b, gidx, :n] = self.rotary(pk[0].to(rs.k_rot.dtype), pos[:n]).transpose(0, 1)
                rs.v[b, gidx, :n] = pv[0].to(rs.v.dtype).transpose(0, 1)
        rs.pre_bias[b] = 0
        rs.pre_bias[b, :, 0].masked_fill_(pos[None, :] >= rs.pre_len[b][:, None], float("-inf"))

    def decode_rows(self, q_B1HD, k_B1GD, v_B1GD, rs: "RowsState"):
        """One new token per row, rows at any positions, in one batched step; updates ``rs``.

        Row b's token sits at offset j_b of its open segment and is rotated at
        prefix_len[b, g] + j_b; each row's keys are masked to its own valid prefix and
        segment. Rows whose segment fills close it (tail, pool, retrieval) one by one,
        which happens once per S steps of a row. Returns the output [B, 1, H, D].
        """
        S, W = self.segment.segment_length, rs.width
        B, _, H, D = q_B1HD.shape
        G = k_B1GD.shape[2]
        dev = q_B1HD.device
        js = [t % S for t in rs.tokens]
        j = torch.tensor(js, device=dev)
        cos_t, sin_t = self.rotary.tables(W + S, dev, rs.k_rot.dtype)
        pos = rs.pre_len + j[:, None]  # [B, G]
        cos, sin = cos_t[pos], sin_t[pos]  # [B, G, D]
        k1, v1 = k_B1GD[:, 0], v_B1GD[:, 0]
        q1 = q_B1HD[:, 0].reshape(B, G, self.hpg, D)
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
            if js[b] + 1 == S:
                self._rows_close(rs, b, q_B1HD[b : b + 1])
        return o.reshape(B, 1, H, D)

    def _rows_close(self, rs: "RowsState", b: int, q_1LHD) -> None:
        """Close row b's full open segment: the run transition of `forward`, then its new prefix."""
        S = self.segment.segment_length
        k_all, v_all = rs.k_open[b : b + 1], rs.v_open[b : b + 1]
        before = rs.closed[b]
        ret = self._retrieve_run(q_1LHD, k_all, v_all, before, S - 1, 1) if self._uses_retrieval else None
        rs.closed[b] = self._next_state(replace(before, tokens=rs.tokens[b] - S), k_all, v_all, S, 1, ret)
        self._rows_set_prefix(rs, b)

    def rows_row(self, rs: "RowsState", b: int) -> LayerState:
        """Row b of ``rs`` as a batch-1 `LayerState`."""
        j = rs.tokens[b] % self.segment.segment_length
        st = replace(rs.closed[b], tokens=rs.tokens[b])
        if j:
            st.open_k, st.open_v = rs.k_open[b : b + 1, :j].clone(), rs.v_open[b : b + 1, :j].clone()
        return st

@dataclass(frozen=True)
class Retrieved:
    """Retrieval results of one run: R for the segment after each boundary closed in it.

    keys/values: [B, C, R', G_ret, D] retrieved KV per boundary (detached, original order).
    count:       [C] valid retrieved tokens per boundary (the rest of R' is padding).
    pool_k/v:    [B, T_closed, G_ret, D] the pool after the run (detached).
    """

    keys: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor
    pool_k: torch.Tensor
    pool_v: torch.Tensor


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)



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

