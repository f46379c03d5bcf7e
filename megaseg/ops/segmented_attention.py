"""The segment-level attention operator F_theta of SEMANTICS.md, for one layer.

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

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops.retrieval import retrieve
from megaseg.ops.rope import Rotary


@dataclass
class LayerState:
    """Cross-segment state of one layer; nothing else crosses a segment boundary.

    tokens:          tokens processed so far; the open segment holds tokens % S of them.
    open_k/open_v:   [B, j, G, D] un-rotated KV of the open segment's tokens (all groups).
    tail_k/tail_v:   [B, m, G_local, D] C_{i-1}: last M KV of the previous segment, local
                     groups only; carries gradient in training.
    ret_k/ret_v:     [B, r, G_ret, D] R_{i-1}: retrieved prefix of the current segment (detached).
    pool_k/pool_v:   [B, T_closed, G_ret, D] retrieval-group KV of all closed segments (detached).
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

    def __init__(self, modes, segment: SegmentConfig, rope: RopeConfig, head_dim: int, heads_per_group: int):
        super().__init__()
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
        order = torch.cat([getattr(self, f"_{m}_heads") for m in (LOCAL, RETRIEVAL, SEGMENT)])
        self.register_buffer("_unpermute", torch.argsort(order), persistent=False)

    def extra_repr(self) -> str:
        return f"modes={self.modes}, {self.segment}"

    # ------------------------------------------------------------------------------------
    def forward(self, q_BLHD, k_BLGD, v_BLGD, state: LayerState | None = None):
        """Attend a run of new tokens. Returns (output [B, L, H, D], new LayerState)."""
        state = state or LayerState()
        S = self.segment.segment_length
        B, L, H, D = q_BLHD.shape
        G = k_BLGD.shape[2]
        if G != len(self.modes) or H != G * self.hpg:
            raise ValueError(f"got {H} query heads / {G} KV groups, layer plan has {len(self.modes)} groups x {self.hpg}")
        j = state.tokens % S
        if j and (state.open_k is None or state.open_k.shape[1] != j):
            raise ValueError(f"state at token {state.tokens} must hold an open segment of {j} tokens")

        # Keys/values of the run, aligned so that segment boundaries fall at multiples of S.
        k_all = torch.cat([state.open_k, k_BLGD], 1) if j else k_BLGD
        v_all = torch.cat([state.open_v, v_BLGD], 1) if j else v_BLGD
        total = j + L
        closed = total // S  # segments that close in this run
        n_seg = -(-total // S)

        # R for relative segments 1..closed (boundaries inside the run), batched.
        ret = self._retrieve_run(q_BLHD, k_all, v_all, state, j, closed) if self._uses_retrieval else None

        outputs = []
        for mode in (LOCAL, RETRIEVAL, SEGMENT):
            if not self.groups[mode]:
                continue
            outputs.append(self._attend_mode(mode, q_BLHD, k_all, v_all, state, j, n_seg, ret))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2).index_select(2, self._unpermute)

        return out, self._next_state(state, k_all, v_all, L, closed, ret)

    # ------------------------------------------------------------------------------------
    def _retrieve_run(self, q_BLHD, k_all, v_all, state, j, closed):
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
        keys, values, count = retrieve(
            q_end_BCGHD, pool_k, pool_v, valid_len, R, self.segment.retrieval_group_reduce
        )
        return keys, values, count, pool_k, pool_v

    def _prefixes(self, mode, k_all, v_all, state, n_seg, ret, gidx):
        """Prefix KV [B, N, P, g, D] and valid length [N] for every segment of the run."""
        S, M = self.segment.segment_length, self.segment.tail_length
        B, _, _, D = k_all.shape
        g = gidx.numel()
        dev = k_all.device
        if mode == SEGMENT or (mode == LOCAL and not self._uses_tail) or (mode == RETRIEVAL and not self._uses_retrieval):
            return None, None, torch.zeros(n_seg, dtype=torch.long, device=dev)
        if mode == LOCAL:
            first_k, first_v = state.tail_k, state.tail_v
            if n_seg > 1:
                # Tail of relative segment r-1 for r = 1..n_seg-1: its last M tokens.
                body = k_all[:, : (n_seg - 1) * S].reshape(B, n_seg - 1, S, -1, D)[:, :, S - M :].index_select(3, gidx)
                body_v = v_all[:, : (n_seg - 1) * S].reshape(B, n_seg - 1, S, -1, D)[:, :, S - M :].index_select(3, gidx)
                rest_len = torch.full((n_seg - 1,), M, dtype=torch.long, device=dev)
        else:
            first_k, first_v = state.ret_k, state.ret_v
            if n_seg > 1:
                body, body_v, count = ret[0][:, : n_seg - 1], ret[1][:, : n_seg - 1], ret[2][: n_seg - 1]
                rest_len = count
        first_len = 0 if first_k is None else first_k.shape[1]
        rest_width = body.shape[2] if n_seg > 1 else 0
        width = max(first_len, rest_width)
        if width == 0:
            return None, None, torch.zeros(n_seg, dtype=torch.long, device=dev)
        first_k = _pad_dim(first_k, 1, width) if first_k is not None else k_all.new_zeros(B, width, g, D)
        first_v = _pad_dim(first_v, 1, width) if first_v is not None else v_all.new_zeros(B, width, g, D)
        lens = [torch.tensor([first_len], device=dev)]
        pk, pv = [first_k.unsqueeze(1)], [first_v.unsqueeze(1)]
        if n_seg > 1:
            pk.append(_pad_dim(body, 2, width))
            pv.append(_pad_dim(body_v, 2, width))
            lens.append(rest_len)
        return torch.cat(pk, 1), torch.cat(pv, 1), torch.cat(lens)

    def _attend_mode(self, mode, q_BLHD, k_all, v_all, state, j, n_seg, ret):
        S = self.segment.segment_length
        gidx = getattr(self, f"_{mode}_groups")
        hidx = getattr(self, f"_{mode}_heads")
        whole = len(self.groups[mode]) == len(self.modes)
        q = q_BLHD if whole else q_BLHD.index_select(2, hidx)
        k = k_all if whole else k_all.index_select(2, gidx)
        v = v_all if whole else v_all.index_select(2, gidx)
        pre_k, pre_v, pre_len = self._prefixes(mode, k_all, v_all, state, n_seg, ret, gidx)
        B, L, h, D = q.shape
        total = j + L
        pieces = []
        # The open segment continued at offset j (when the run starts inside it).
        first_full = 0
        if j:
            lk = min(S, total)
            pieces.append(
                self._attend(
                    q[:, : lk - j].unsqueeze(1), k[:, :lk].unsqueeze(1), v[:, :lk].unsqueeze(1),
                    None if pre_k is None else pre_k[:, :1], None if pre_v is None else pre_v[:, :1],
                    pre_len[:1], j,
                )
            )
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
            o = self._attend(
                qs.reshape(B, n, width, h, D), ks.reshape(B, n, width, -1, D), vs.reshape(B, n, width, -1, D),
                None if pre_k is None else pre_k[:, first_full:], None if pre_v is None else pre_v[:, first_full:],
                pre_len[first_full:], 0,
            )
            pieces.append(o.reshape(B, n * width, h, D)[:, : n * width - pad])
        return torch.cat([p.reshape(B, -1, h, D) for p in pieces], 1) if len(pieces) > 1 else pieces[0].reshape(B, L, h, D)

    def _attend(self, q_BNQhD, k_BNKgD, v_BNKgD, pre_k, pre_v, pre_len_N, q_offset):
        """Causal attention of each segment's queries over [its prefix ; its keys].

        Positions (SEMANTICS §3): prefix slots 0..P-1, segment key t at prefix_len + t,
        query a at prefix_len + q_offset + a.
        """
        B, N, Q, h, D = q_BNQhD.shape
        K, g = k_BNKgD.shape[2], k_BNKgD.shape[3]
        P = 0 if pre_k is None else pre_k.shape[2]
        dev = q_BNQhD.device
        key_pos = pre_len_N[:, None] + torch.arange(K, device=dev)  # [N, K]
        q_rot = self.rotary(q_BNQhD, key_pos[:, q_offset : q_offset + Q])
        k_rot = self.rotary(k_BNKgD, key_pos)
        v_cat = v_BNKgD
        if P:
            pre_pos = torch.arange(P, device=dev).expand(N, P)
            k_rot = torch.cat([self.rotary(pre_k, pre_pos), k_rot], 2)
            v_cat = torch.cat([pre_v, v_BNKgD], 2)
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
            keys, values, count, pool_k, pool_v = ret
            c = int(count[-1])
            new.ret_k, new.ret_v = keys[:, -1, :c], values[:, -1, :c]
            new.pool_k, new.pool_v = pool_k, pool_v
        return new


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)

