"""Context parallelism over segments: each rank holds a contiguous, segment-aligned chunk of
every sequence; KV tails travel point-to-point and retrieval is a distributed exact top-R.

    layout = ChunkLayout(seq_length=T, segment_length=S, size=P)
    chunk = SequenceChunk.for_this_rank(layout, tbptt_k=K)      # after initialize_model_parallel(cp=P)
    logits_BLV = context_parallel_forward(model, ids_BT[:, slice(*chunk.token_range)], chunk)
    chunk.backward(loss(logits_BLV, labels of the chunk))   # the exact TBPTT-K gradient

At layer l a segment needs only layer-l quantities: its own q/k/v, the previous segment's
last M keys/values (local heads) and earlier tokens' keys/values chosen by the previous
segment's end query (retrieval heads). So each rank runs its chunk through the model in one
call, layer by layer in step with the others, and per layer exchanges only

* the last tail of its chunk, to the next rank (forward; its cotangent comes back in the
  backward),
* its segment-end queries, to every earlier rank, which answers with its best R
  (score, position, key, value) candidates per query; the merge keeps `select_top_r`'s rule
  (ties: the earlier position wins) and the original token order,
* the retrieved prefix of its last boundary, to the next rank (the prefix of that rank's
  first segment).

The pool is never sent. Exact TBPTT-K (K >= 0): every tail a segment reads is a leaf (the
previous rank's last tail too), so the loss's backward stops at every boundary; then K
pushes each send the cotangents the leaves collected back into the tails they copy (the
previous segment's, or across ranks the previous rank's), so pass d adds exactly the paths
that cross d boundaries — the sequential engine's gradient, from one forward of the chunk.
K = -1 is the untruncated gradient: tails stay attached and their cotangents cross ranks
inside the backward. Bytes sent are counted per kind in ``chunk.sent`` and follow
`bytes_per_layer` exactly.

Shape legend: B batch, L chunk tokens, C segment boundaries (closed segments) of a chunk,
G KV groups of a mode, h query heads per group, D head dim, R retrieval length.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaseg.config import ConfigError
from megaseg.ops.retrieval import merge_top_r, retrieval_scores, select_top_r

# Message kinds, in the tag of each point-to-point message (with the layer index).
KINDS = ("tail", "tail_grad", "query", "candidates", "prefix")


@dataclass(frozen=True)
class ChunkLayout:
    """How a sequence of ``seq_length`` tokens splits into ``size`` contiguous chunks of whole
    segments. The first ``num_segments % size`` ranks hold one segment more; an uneven
    last segment is on the last rank, so every chunk boundary is a segment boundary."""

    seq_length: int
    segment_length: int
    size: int

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"context_parallel_size={self.size} is invalid: must be >= 1")
        if self.num_segments < self.size:
            raise ConfigError(
                f"context_parallel_size={self.size} is invalid: a sequence of seq_length={self.seq_length} has "
                f"{self.num_segments} segment(s) of segment_length={self.segment_length}; every context-parallel "
                f"rank needs at least one (use at most {self.num_segments})"
            )

    @property
    def num_segments(self) -> int:
        return -(-self.seq_length // self.segment_length)

    def segment_range(self, rank: int) -> tuple[int, int]:
        base, extra = divmod(self.num_segments, self.size)
        first = rank * base + min(rank, extra)
        return first, first + base + (1 if rank < extra else 0)

    def token_range(self, rank: int) -> tuple[int, int]:
        first, stop = self.segment_range(rank)
        return first * self.segment_length, min(stop * self.segment_length, self.seq_length)

    def tokens(self, rank: int) -> int:
        start, stop = self.token_range(rank)
        return stop - start

    def boundaries(self, rank: int) -> int:
        """Segments of the chunk that close (all but an uneven last one)."""
        return self.tokens(rank) // self.segment_length


def bytes_per_layer(layout: ChunkLayout, *, batch: int, tbptt_k: int, head_dim: int, local_groups: int,
                    retrieval_groups: int, heads_per_group: int, tail_length: int, retrieval_length: int,
                    element_size: int) -> dict[str, int]:
    """Bytes all ranks together send for one layer in one forward + backward, by kind.

    tail        (P - 1) tails of B x M x G_local x 2D values
    tail_grad   their cotangents: once per push (K) for K >= 0, once when untruncated (K = -1)
    query       each rank's C_r segment-end queries (B x G_ret x h x D) to each earlier rank
    candidates  for every (earlier rank e, query of a later rank): min(R, L_e) candidates per
                group, each a float32 score, an int64 position and 2D values
    prefix      each rank but the last: the retrieved prefix of its last boundary,
                B x min(R, tokens before the next rank) x G_ret x 2D values
    """
    P, B, D, e = layout.size, batch, head_dim, element_size
    M, R = tail_length, retrieval_length
    out = dict.fromkeys(KINDS, 0)
    if local_groups and M:
        tail = B * M * local_groups * 2 * D * e
        out["tail"] = (P - 1) * tail
        out["tail_grad"] = (P - 1) * tail * (tbptt_k if tbptt_k >= 0 else 1)
    if retrieval_groups and R:
        for r in range(P):
            C = layout.boundaries(r)
            out["query"] += r * B * C * retrieval_groups * heads_per_group * D * e
            for earlier in range(r):
                n = min(R, layout.tokens(earlier))
                out["candidates"] += B * C * retrieval_groups * n * (4 + 8 + 2 * D * e)
            if r + 1 < P:
                out["prefix"] += B * min(R, layout.token_range(r + 1)[0]) * retrieval_groups * 2 * D * e
    return out


def ring_bytes_per_layer(layout: ChunkLayout, *, batch: int, kv_groups: int, head_dim: int, element_size: int) -> int:
    """Forward bytes of ring attention for one layer: every rank's K/V chunk reaches every
    other rank, (P - 1) x (all chunks' K and V). Its backward sends K/V and their
    gradients around the ring once more, so a step sends about 3x this; comparisons here
    use the forward alone, which favours ring attention."""
    return (layout.size - 1) * batch * layout.seq_length * kv_groups * 2 * head_dim * element_size


class SequenceChunk:
    """This rank's chunk of the sequences of one forward (and backward) call, and the messages
    the segmented operator exchanges with the other context-parallel ranks for it."""

    def __init__(self, layout: ChunkLayout, rank: int, tbptt_k: int, group=None, ranks: list[int] | None = None):
        if tbptt_k < -1:
            raise ConfigError(f"tbptt_k={tbptt_k} is invalid: must be >= 0, or -1 for the untruncated gradient")
        self.layout, self.rank, self.size = layout, rank, layout.size
        self.group = group
        self.ranks = ranks if ranks is not None else list(range(layout.size))
        if self.size > 1 and len(self.ranks) != self.size:
            raise ValueError(f"{len(self.ranks)} global ranks for a context-parallel size of {self.size}")
        self.start, self.stop = layout.token_range(rank)
        self.token_range = (self.start, self.stop)
        self.tbptt_k = tbptt_k
        self.truncated = tbptt_k >= 0
        self.sent: Counter = Counter()
        self._pending: list = []
        # TBPTT-K pushes (truncated, K > 0, with gradient): per layer, the leaves the chunk's
        # segments read as tails and what they copy.
        self._inner: list = []  # (tails inside the chunk, their leaves), k and v
        self._first: dict[int, torch.Tensor] = {}  # layer -> leaf of the previous rank's tail
        self._last: dict[int, torch.Tensor] = {}  # layer -> this chunk's last tail (sent on)
        self._placeholders: list = []  # empty slices: a TP rank whose peers push this layer

    @classmethod
    def for_this_rank(cls, layout: ChunkLayout, tbptt_k: int) -> "SequenceChunk":
        """The chunk of this process's context-parallel rank (megatron's CP group); with
        ``layout.size`` 1 the whole sequence, no messages."""
        if layout.size == 1:
            return cls(layout, 0, tbptt_k)
        from megatron.core import parallel_state as ps

        if ps.get_context_parallel_world_size() != layout.size:
            raise ConfigError(
                f"context_parallel_size={layout.size} does not match the initialized context-parallel group "
                f"({ps.get_context_parallel_world_size()} ranks)"
            )
        return cls(layout, ps.get_context_parallel_rank(), tbptt_k, group=ps.get_context_parallel_group(),
                   ranks=ps.get_context_parallel_global_ranks())

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    # ---- point-to-point -----------------------------------------------------------------
    def _tag(self, layer: int, kind: str) -> int:
        return layer * len(KINDS) + KINDS.index(kind)

    def _send(self, tensor: torch.Tensor, peer: int, layer: int, kind: str) -> None:
        t = tensor.detach().contiguous()
        self.sent[kind] += t.numel() * t.element_size()
        self._pending.append((dist.isend(t, self.ranks[peer], group=self.group, tag=self._tag(layer, kind)), t))

    def _recv(self, shape, dtype, device, peer: int, layer: int, kind: str):
        t = torch.empty(shape, dtype=dtype, device=device)
        return dist.irecv(t, self.ranks[peer], group=self.group, tag=self._tag(layer, kind)), t

    def finish(self) -> None:
        """Wait for every message this rank has sent (call after the backward, or after a
        forward-only call)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    # ---- local heads: tails --------------------------------------------------------------
    def _pushes(self) -> bool:
        """Whether this call keeps leaves for TBPTT-K pushes (K > 0, gradient enabled)."""
        return self.truncated and self.tbptt_k > 0 and torch.is_grad_enabled()

    def exchange_tail(self, layer: int, my_tail: torch.Tensor | None, anchor: torch.Tensor, shape: tuple):
        """Send this chunk's last tail (keys and values concatenated, [B, M, G, 2D]) to the next
        rank; return the previous rank's ([B, M, G, 2D]), or None on the first rank.
        ``shape`` is (M, G, 2D); ``anchor`` is a tensor of this layer's graph. Untruncated, the
        received tail's cotangent goes back inside the backward; for TBPTT-K it is a leaf
        whose gradient `backward` sends back between pushes."""
        if my_tail is not None and not self.is_last:
            self._send(my_tail, self.rank + 1, layer, "tail")
        if self.is_first:
            return None
        work, values = self._recv((anchor.shape[0], *shape), anchor.dtype, anchor.device, self.rank - 1, layer, "tail")
        work.wait()
        if not self.truncated and torch.is_grad_enabled() and anchor.requires_grad:
            return _TailFromPrevious.apply(self, layer, values, anchor)
        if self._pushes():
            self._first[layer] = values.requires_grad_(True)
        return values

    def link_tail(self, layer: int, my_tail: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out``, unchanged; the tail sent to the next rank gets that rank's cotangent: inside
        the backward (untruncated), or in the pushes of `backward` (TBPTT-K)."""
        if self.is_last or not (torch.is_grad_enabled() and out.requires_grad):
            return out
        if not self.truncated:
            return _TailToNext.apply(self, layer, my_tail, out)
        if self._pushes():
            self._last[layer] = my_tail
        return out

    def cut_tails(self, layer: int, body_k: torch.Tensor, body_v: torch.Tensor):
        """The tails the chunk's segments read from their previous segments: attached when
        untruncated, detached for K = 0, leaves (pushed by `backward`) for K > 0."""
        if not self.truncated:
            return body_k, body_v
        if not self._pushes():
            return body_k.detach(), body_v.detach()
        leaf_k, leaf_v = body_k.detach().requires_grad_(True), body_v.detach().requires_grad_(True)
        self._inner.append((body_k, leaf_k))
        self._inner.append((body_v, leaf_v))
        return leaf_k, leaf_v

    def placeholder(self, layer: int, chunk_tokens: int, empty: torch.Tensor) -> None:
        """A tensor-parallel rank without `local` groups in a layer where its peers have some
        pushes ``empty`` (a zero-size slice of its keys) whenever they push a tail of that
        layer, so every TP rank runs the same collectives in each push."""
        n_seg = -(-chunk_tokens // self.layout.segment_length)
        if self._pushes() and (n_seg > 1 or not self.is_last) and empty.requires_grad:
            self._placeholders.append(empty)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` with this chunk's gradient rule, then wait for every message.

        TBPTT-K: the loss's backward stops at every carried tail; push d (d = 1..K) sends each
        leaf's cotangent into the tail it copies — the previous segment's, or the previous
        rank's (point-to-point) — and so adds the paths crossing exactly d boundaries."""
        try:
            pushes = self.tbptt_k if self._pushes() else 0
            loss.backward(retain_graph=pushes > 0)
            for d in range(1, pushes + 1):
                outputs, grads = [], []
                for layer, leaf in sorted(self._first.items()):
                    self._send(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf), self.rank - 1, layer,
                               "tail_grad")
                    leaf.grad = None
                for layer, tail in sorted(self._last.items()):
                    work, got = self._recv(tail.shape, tail.dtype, tail.device, self.rank + 1, layer, "tail_grad")
                    work.wait()
                    outputs.append(tail)
                    grads.append(got)
                # Every registered tail is pushed, with zeros where no path reached its leaf:
                # each tensor-parallel rank then runs the same collectives in every push.
                for tail, leaf in self._inner:
                    outputs.append(tail)
                    grads.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
                    leaf.grad = None
                for empty in self._placeholders:
                    outputs.append(empty)
                    grads.append(torch.zeros_like(empty))
                if outputs:
                    torch.autograd.backward(outputs, grads, retain_graph=d < pushes)
        finally:
            self._inner, self._first, self._last, self._placeholders = [], {}, {}, []
            self.finish()

    # ---- retrieval heads: distributed exact top-R ------------------------------------------
    @torch.no_grad()
    def retrieve(self, layer: int, q_end_BCGhD: torch.Tensor, k_BLGD: torch.Tensor, v_BLGD: torch.Tensor,
                 r: int, group_reduce: str):
        """Retrieved prefixes of this chunk's boundaries over every earlier token of the sequence.

        Returns keys and values [B, C, R', G, D] in ascending token order, the valid count
        per boundary [C] (= min(R, tokens before the next segment)), and the prefix of the
        chunk's first segment as (keys, values) [B, R'', G, D] from the previous rank (None
        on the first rank). Collective over the context-parallel ranks.
        """
        layout, S = self.layout, self.layout.segment_length
        B, C, G, h, D = q_end_BCGhD.shape
        L = k_BLGD.shape[1]
        dev, q_dtype, kv_dtype = k_BLGD.device, q_end_BCGhD.dtype, k_BLGD.dtype
        # 1. Segment-end queries to every earlier rank; later ranks' queries in.
        for earlier in range(self.rank):
            if C:
                self._send(q_end_BCGhD, earlier, layer, "query")
        later = {}
        for peer in range(self.rank + 1, self.size):
            Cp = layout.boundaries(peer)
            if Cp:
                later[peer] = self._recv((B, Cp, G, h, D), q_dtype, dev, peer, layer, "query")
        # 2. This chunk's best candidates for each later rank's queries (all of its tokens are
        #    before them).
        n = min(r, L)
        for peer, (work, q_peer) in later.items():
            work.wait()
            scores = retrieval_scores(q_peer, k_BLGD, group_reduce)  # [B, G, Cp, L]
            idx = select_top_r(scores, torch.full((q_peer.shape[1],), L, device=dev), n)
            keys, values = _gather_tokens(k_BLGD, idx), _gather_tokens(v_BLGD, idx)
            self._send(scores.gather(-1, idx).float(), peer, layer, "candidates")
            self._send(idx + self.start, peer, layer, "candidates")
            self._send(torch.cat([keys, values], -1), peer, layer, "candidates")
        # 3. Earlier ranks' candidates for this chunk's queries, merged with its own.
        incoming = []
        if C:
            for earlier in range(self.rank):
                ne = min(r, layout.tokens(earlier))
                incoming.append((
                    self._recv((B, G, C, ne), torch.float32, dev, earlier, layer, "candidates"),
                    self._recv((B, G, C, ne), torch.long, dev, earlier, layer, "candidates"),
                    self._recv((B, C, ne, G, 2 * D), kv_dtype, dev, earlier, layer, "candidates"),
                ))
        valid_C = torch.arange(1, C + 1, device=dev) * S  # local tokens before each boundary
        scores = retrieval_scores(q_end_BCGhD, k_BLGD, group_reduce)
        idx = select_top_r(scores, valid_C, r)
        local_ok = idx < valid_C[:, None]
        parts_score = [scores.gather(-1, idx).float().masked_fill(~local_ok, float("-inf"))]
        parts_pos = [idx + self.start]
        parts_kv = [torch.cat([_gather_tokens(k_BLGD, idx), _gather_tokens(v_BLGD, idx)], -1)]
        for recv_score, recv_pos, recv_kv in incoming:
            for work, _ in (recv_score, recv_pos, recv_kv):
                work.wait()
            parts_score.insert(-1, recv_score[1])
            parts_pos.insert(-1, recv_pos[1])
            parts_kv.insert(-1, recv_kv[1])
        cand_kv = torch.cat(parts_kv, 2)  # [B, C, N, G, 2D]
        pick = merge_top_r(torch.cat(parts_score, -1), torch.cat(parts_pos, -1), r)  # [B, G, C, R']
        pick_BCRG = pick.permute(0, 2, 3, 1)
        kv = cand_kv.gather(2, pick_BCRG.unsqueeze(-1).expand(*pick_BCRG.shape, 2 * D))
        keys, values = kv[..., :D], kv[..., D:]
        count = torch.clamp(self.start + valid_C, max=r)
        # 4. The prefix of the next rank's first segment; this chunk's from the previous rank.
        if not self.is_last and C:
            c = int(count[-1])
            self._send(kv[:, -1, :c], self.rank + 1, layer, "prefix")
        first = None
        if not self.is_first:
            work, prev = self._recv((B, min(r, self.start), G, 2 * D), kv_dtype, dev, self.rank - 1, layer, "prefix")
            work.wait()
            first = (prev[..., :D], prev[..., D:])
        return keys, values, count, first


def _gather_tokens(x_BLGD: torch.Tensor, idx_BGCR: torch.Tensor) -> torch.Tensor:
    """x at token indices idx per group: [B, C, R, G, D]."""
    b, g, c, rk = idx_BGCR.shape
    d = x_BLGD.shape[-1]
    idx = idx_BGCR.permute(0, 2, 3, 1).reshape(b, c * rk, g, 1).expand(b, c * rk, g, d)
    return torch.gather(x_BLGD, 1, idx).reshape(b, c, rk, g, d)


class _TailFromPrevious(torch.autograd.Function):
    """The previous rank's tail (untruncated gradient); its cotangent goes back to that rank."""

    @staticmethod
    def forward(ctx, chunk: SequenceChunk, layer: int, values: torch.Tensor, anchor: torch.Tensor):
        ctx.chunk, ctx.layer = chunk, layer
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.chunk._send(grad, ctx.chunk.rank - 1, ctx.layer, "tail_grad")
        return None, None, None, None


class _TailToNext(torch.autograd.Function):
    """Identity on the attention output (untruncated gradient); its backward adds the
    cotangent of the tail this rank sent, received from the next rank, to the tail's."""

    @staticmethod
    def forward(ctx, chunk: SequenceChunk, layer: int, my_tail: torch.Tensor, out: torch.Tensor):
        ctx.chunk, ctx.layer = chunk, layer
        ctx.tail_shape, ctx.tail_dtype = my_tail.shape, my_tail.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        chunk = ctx.chunk
        work, got = chunk._recv(ctx.tail_shape, ctx.tail_dtype, grad_out.device, chunk.rank + 1, ctx.layer, "tail_grad")
        work.wait()
        return None, None, got, grad_out


def context_parallel_forward(model, ids_BL: torch.Tensor, chunk: SequenceChunk) -> torch.Tensor:
    """Logits [B, L, V] of this rank's chunk ``ids_BL`` of the sequences; backpropagate a loss
    of them with ``chunk.backward(loss)``."""
    from megatron.core.utils import unwrap_model

    from megaseg.megatron.attention import SegmentStates

    gpt = unwrap_model(model)
    if ids_BL.shape[1] != chunk.stop - chunk.start:
        raise ValueError(f"chunk {chunk.token_range} of the sequence needs {chunk.stop - chunk.start} tokens, "
                         f"got {ids_BL.shape[1]}")
    logits = model(ids_BL, position_ids=None, attention_mask=None, packed_seq_params=SegmentStates(chunk=chunk),
                   runtime_gather_output=True)
    return logits[..., : gpt.megaseg_config.vocab_size]


def _segment_sums(logits_BLV, labels_BL, chunk: SequenceChunk):
    """Summed NLL of the chunk (a tensor) and, per segment of the whole sequence, the NLL sum
    and labelled-token count of this chunk's part (zero elsewhere)."""
    import torch.nn.functional as F

    layout, S = chunk.layout, chunk.layout.segment_length
    nll_BL = F.cross_entropy(logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=-100,
                             reduction="none").view(labels_BL.shape)
    detached = nll_BL.detach()
    labelled = labels_BL != -100
    sums, counts = [0.0] * layout.num_segments, [0] * layout.num_segments
    first, stop = layout.segment_range(chunk.rank)
    for i in range(first, stop):
        a, b = i * S - chunk.start, min((i + 1) * S, layout.seq_length) - chunk.start
        sums[i] = float(detached[:, a:b].sum())
        counts[i] = int(labelled[:, a:b].sum())
    return nll_BL.sum(), sums, counts


def chunk_backward(model, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor, layout: ChunkLayout, tbptt_k: int,
                   loss_scale: float = 1.0, num_predicted: int | None = None):
    """Forward and backward of this rank's chunk of whole sequences; accumulates ``.grad``.

    The same contract as `megaseg.training.tbptt.tbptt_backward`, whose result type it
    returns: the loss backpropagated is ``loss_scale * (NLL sum of this chunk) /
    num_predicted``, so with loss_scale = data x context-parallel size and the global
    number of predicted tokens the reduced gradient is that of the global token mean.
    ``StepResult.loss`` is this chunk's NLL sum / num_predicted; segment lists cover every
    segment of the sequence, with this chunk's part (others 0).
    """
    from megaseg.training.tbptt import StepResult

    chunk = SequenceChunk.for_this_rank(layout, tbptt_k)
    a, b = chunk.token_range
    labels = labels_BT[:, a:b]
    denom = max(num_predicted if num_predicted is not None else int((labels != -100).sum()), 1)
    total, sums, counts = _segment_sums(context_parallel_forward(model, input_ids_BT[:, a:b], chunk), labels, chunk)
    chunk.backward(total.mul(loss_scale / denom))
    return StepResult(loss=float(total.detach()) / denom, segment_losses=[s / max(c, 1) for s, c in zip(sums, counts)],
                      segment_tokens=counts, tokens=int(labels.numel()))


@torch.no_grad()
def chunk_losses(model, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor, layout: ChunkLayout):
    """Forward-only: (NLL sum, labelled tokens) per segment of the sequence, this chunk's part."""
    chunk = SequenceChunk.for_this_rank(layout, -1)
    a, b = chunk.token_range
    try:
        _, sums, counts = _segment_sums(context_parallel_forward(model, input_ids_BT[:, a:b], chunk),
                                        labels_BT[:, a:b], chunk)
    finally:
        chunk.finish()
    return sums, counts
