"""Context parallelism over segments: each rank holds a contiguous, segment-aligned chunk of
every sequence; KV tails travel point-to-point and retrieval is a distributed exact top-R.

This module is the layout (`ChunkLayout`) and the message protocol (`SequenceChunk`): what
each rank sends to which peer, per layer, in a forward. The gradient rule of a training
step (leaves, pushes, cotangents sent back) is `megaseg.training.chunk.TrainingChunk`; the
bytes of each kind of message are `megaseg.parallel.traffic`.

    layout = ChunkLayout(seq_length=T, segment_length=S, size=P)
    chunk = SequenceChunk.for_this_rank(layout)      # after initialize_model_parallel(cp=P)
    logits_BLV = context_parallel_forward(model, ids_BT[:, slice(*chunk.token_range)], chunk)  # forward only

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
`megaseg.parallel.traffic.bytes_per_layer` exactly.

Shape legend: B batch, L chunk tokens, C segment boundaries (closed segments) of a chunk,
G KV groups of a mode, h query heads per group, D head dim, R retrieval length.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaseg.config import ConfigError
from megaseg.ops.recompute import recomputing
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


class SequenceChunk:
    """This rank's chunk of the sequences of one forward (and backward) call, and the messages
    the segmented operator exchanges with the other context-parallel ranks for it."""

    def __init__(self, layout: ChunkLayout, rank: int, group=None, ranks: list[int] | None = None):
        self.layout, self.rank, self.size = layout, rank, layout.size
        self.group = group
        self.ranks = ranks if ranks is not None else list(range(layout.size))
        if self.size > 1 and len(self.ranks) != self.size:
            raise ValueError(f"{len(self.ranks)} global ranks for a context-parallel size of {self.size}")
        self.start, self.stop = layout.token_range(rank)
        self.token_range = (self.start, self.stop)
        self.sent: Counter = Counter()
        self._pending: list = []
        # What each layer received, in order per kind: a recompute of the layer (in the
        # backward, megaseg.ops.recompute) replays it instead of exchanging messages again.
        self._received: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._replay: Counter = Counter()

    @classmethod
    def for_this_rank(cls, layout: ChunkLayout, *args):
        """The chunk of this process's context-parallel rank (megatron's CP group); with
        ``layout.size`` 1 the whole sequence, no messages. ``args`` follow the rank in the
        constructor of ``cls``."""
        if layout.size == 1:
            return cls(layout, 0, *args)
        from megatron.core import parallel_state as ps

        if ps.get_context_parallel_world_size() != layout.size:
            raise ConfigError(
                f"context_parallel_size={layout.size} does not match the initialized context-parallel group "
                f"({ps.get_context_parallel_world_size()} ranks)"
            )
        return cls(layout, ps.get_context_parallel_rank(), *args, group=ps.get_context_parallel_group(),
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

    def begin_layer(self, layer: int) -> None:
        """Called when a layer starts its run of the chunk (first time or recompute)."""
        for kind in KINDS:
            self._replay[(layer, kind)] = 0

    def _send(self, tensor: torch.Tensor, peer: int, layer: int, kind: str) -> None:
        if recomputing():
            return
        t = tensor.detach().contiguous()
        self.sent[kind] += t.numel() * t.element_size()
        self._pending.append((dist.isend(t, self.ranks[peer], group=self.group, tag=self._tag(layer, kind)), t))

    def _recv(self, shape, dtype, device, peer: int, layer: int, kind: str):
        log = self._received.setdefault((layer, kind), [])
        if recomputing():
            n = self._replay[(layer, kind)]
            self._replay[(layer, kind)] = n + 1
            return _Done(), log[n]
        t = torch.empty(shape, dtype=dtype, device=device)
        log.append(t)
        return dist.irecv(t, self.ranks[peer], group=self.group, tag=self._tag(layer, kind)), t

    def finish(self) -> None:
        """Wait for every message this rank has sent (call after the backward, or after a
        forward-only call)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        self._received = {}

    # ---- local heads: tails (forward values; the gradient rule is training's) ----------
    def exchange_tail(self, layer: int, my_tail: torch.Tensor | None, anchor: torch.Tensor, shape: tuple):
        """Send this chunk's last tail (keys and values concatenated, [B, M, G, 2D]) to the next
        rank; return the previous rank's ([B, M, G, 2D]), or None on the first rank.
        ``shape`` is (M, G, 2D); ``anchor`` is a tensor of this layer's graph (batch, dtype
        and device of the received tail)."""
        if my_tail is not None and not self.is_last:
            self._send(my_tail, self.rank + 1, layer, "tail")
        if self.is_first:
            return None
        work, values = self._recv((anchor.shape[0], *shape), anchor.dtype, anchor.device, self.rank - 1, layer, "tail")
        work.wait()
        return values

    def link_tail(self, layer: int, my_tail: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out``, unchanged: in a forward-only call no cotangent comes back."""
        return out

    def cut_tails(self, layer: int, body_k: torch.Tensor, body_v: torch.Tensor):
        """The tails the chunk's segments read from their previous segments (unchanged here)."""
        return body_k, body_v

    def placeholder(self, layer: int, chunk_tokens: int, empty: torch.Tensor) -> None:
        """Only a call with gradient pushes (see megaseg.training.chunk)."""

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
        # 1. Segment-end queries to every earlier rank; later ranks' queries in.
        later = self._exchange_queries(layer, q_end_BCGhD, k_BLGD.device)
        # 2. This chunk's best candidates for each later rank's queries (all of its tokens are
        #    before them).
        self._answer_queries(layer, later, k_BLGD, v_BLGD, r, group_reduce)
        # 3. Earlier ranks' candidates for this chunk's queries, merged with its own.
        keys, values, count, kv = self._merge_candidates(layer, q_end_BCGhD, k_BLGD, v_BLGD, r, group_reduce)
        # 4. The prefix of the next rank's first segment; this chunk's from the previous rank.
        first = self._exchange_prefix(layer, q_end_BCGhD, k_BLGD, kv, count, r)
        return keys, values, count, first

    def _exchange_queries(self, layer: int, q_end_BCGhD: torch.Tensor, dev: torch.device) -> dict:
        """Send this chunk's segment-end queries to every earlier rank; post the receives of
        every later rank's: {peer: (work, queries [B, Cp, G, h, D])}."""
        B, C, G, h, D = q_end_BCGhD.shape
        for earlier in range(self.rank):
            if C:
                self._send(q_end_BCGhD, earlier, layer, "query")
        later = {}
        for peer in range(self.rank + 1, self.size):
            Cp = self.layout.boundaries(peer)
            if Cp:
                later[peer] = self._recv((B, Cp, G, h, D), q_end_BCGhD.dtype, dev, peer, layer, "query")
        return later

    def _answer_queries(self, layer: int, later: dict, k_BLGD: torch.Tensor, v_BLGD: torch.Tensor, r: int,
                        group_reduce: str) -> None:
        """Send each later rank this chunk's best min(R, L) candidates (score, position, key and
        value) for its queries."""
        L, dev = k_BLGD.shape[1], k_BLGD.device
        n = min(r, L)
        for peer, (work, q_peer) in later.items():
            work.wait()
            scores = retrieval_scores(q_peer, k_BLGD, group_reduce)  # [B, G, Cp, L]
            idx = select_top_r(scores, torch.full((q_peer.shape[1],), L, device=dev), n)
            keys, values = _gather_tokens(k_BLGD, idx), _gather_tokens(v_BLGD, idx)
            self._send(scores.gather(-1, idx).float(), peer, layer, "candidates")
            self._send(idx + self.start, peer, layer, "candidates")
            self._send(torch.cat([keys, values], -1), peer, layer, "candidates")

    def _merge_candidates(self, layer: int, q_end_BCGhD: torch.Tensor, k_BLGD: torch.Tensor,
                          v_BLGD: torch.Tensor, r: int, group_reduce: str):
        """This chunk's top-R over the earlier ranks' candidates and its own tokens: keys and
        values [B, C, R', G, D], the valid count per boundary [C], and the merged keys and
        values concatenated [B, C, R', G, 2D]."""
        S = self.layout.segment_length
        B, C, G, h, D = q_end_BCGhD.shape
        dev, kv_dtype = k_BLGD.device, k_BLGD.dtype
        incoming = []
        if C:
            for earlier in range(self.rank):
                ne = min(r, self.layout.tokens(earlier))
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
        return keys, values, count, kv

    def _exchange_prefix(self, layer: int, q_end_BCGhD: torch.Tensor, k_BLGD: torch.Tensor, kv: torch.Tensor,
                         count: torch.Tensor, r: int):
        """Send the retrieved prefix of this chunk's last boundary to the next rank (the prefix
        of its first segment); return this chunk's from the previous rank as (keys, values)
        [B, R'', G, D], or None on the first rank."""
        B, C, G, h, D = q_end_BCGhD.shape
        if not self.is_last and C:
            c = int(count[-1])
            self._send(kv[:, -1, :c], self.rank + 1, layer, "prefix")
        first = None
        if not self.is_first:
            work, prev = self._recv((B, min(r, self.start), G, 2 * D), k_BLGD.dtype, k_BLGD.device, self.rank - 1,
                                    layer, "prefix")
            work.wait()
            first = (prev[..., :D], prev[..., D:])
        return first

def _gather_tokens(x_BLGD: torch.Tensor, idx_BGCR: torch.Tensor) -> torch.Tensor:
    """x at token indices idx per group: [B, C, R, G, D]."""
    b, g, c, rk = idx_BGCR.shape
    d = x_BLGD.shape[-1]
    idx = idx_BGCR.permute(0, 2, 3, 1).reshape(b, c * rk, g, 1).expand(b, c * rk, g, d)
    return torch.gather(x_BLGD, 1, idx).reshape(b, c, rk, g, d)


class _Done:
    """A completed receive (what a recompute replays)."""

    def wait(self) -> None:
        return None
