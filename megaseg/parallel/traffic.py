"""Bytes on the wire per layer: megaseg's context parallelism over segments against ring
attention, for the benchmark (tools/bench_cp.py) and docs/parallelism.md. The counts
`SequenceChunk.sent` records in a real run equal `bytes_per_layer` (tested).
"""
from __future__ import annotations

from megaseg.parallel.context import KINDS, ChunkLayout


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
