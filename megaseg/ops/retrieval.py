"""Forward-only top-R retrieval from the detached KV pool (docs/semantics.md §4).

Shape legend: B batch, C retrieval rows (one per segment boundary), T pool tokens,
G retrieval KV groups, D head dim, R retrieved tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@torch.no_grad()
def select_top_r(scores_BGCT: torch.Tensor, valid_len_C: torch.Tensor, r: int) -> torch.Tensor:
    """Indices [B, G, C, min(r, T)] of the top-``r`` scores per row, in ascending token order.

    Row c may only pick tokens t < valid_len_C[c]. Ties are broken by the earlier position.
    When a row has fewer than r valid tokens, all of them are picked and come first; the
    remaining slots hold masked positions and must be ignored by the caller.
    """
    t = scores_BGCT.shape[-1]
    rk = min(r, t)
    pos_T = torch.arange(t, device=scores_BGCT.device)
    valid = pos_T < valid_len_C.to(scores_BGCT.device)[:, None]
    # A NaN score (a diverged forward) ranks lowest, so the picks stay in range and the
    # step's non-finite loss is skipped by the trainer instead of crashing here.
    masked = scores_BGCT.masked_fill(~valid | scores_BGCT.isnan(), float("-inf"))
    threshold = masked.topk(rk, dim=-1, sorted=True).values[..., -1:]
    above = masked > threshold
    at = masked == threshold
    need = rk - above.sum(-1, keepdim=True)
    chosen = above | (at & (at.cumsum(-1) <= need))
    # Each row has exactly rk chosen positions; list them in ascending order.
    key = torch.where(chosen, pos_T, pos_T + t)
    return key.topk(rk, dim=-1, largest=False, sorted=True).values


@torch.no_grad()
def retrieval_scores(query_end_BCGHD: torch.Tensor, keys_BTGD: torch.Tensor, group_reduce: str = "sum") -> torch.Tensor:
    """Scores [B, G, C, T] of every key against every boundary's segment-end query (fp32 or wider).

    "sum" adds the heads' scores (one dot product with the summed query), "max" takes the
    largest head score. A key's score depends on that key and the query only, so any split
    of the pool into pieces scores each piece exactly as the whole pool.
    """
    dtype = torch.promote_types(query_end_BCGHD.dtype, torch.float32)
    q, k = query_end_BCGHD.to(dtype), keys_BTGD.to(dtype)
    if group_reduce == "sum":
        return torch.einsum("bcgd,btgd->bgct", q.sum(3), k)
    if group_reduce == "max":
        return torch.einsum("bcghd,btgd->bghct", q, k).amax(2)
    raise ValueError(f"group_reduce={group_reduce!r}: allowed 'sum', 'max'")


@torch.no_grad()
def merge_top_r(scores_BGCN: torch.Tensor, positions_BGCN: torch.Tensor, r: int) -> torch.Tensor:
    """Indices [B, G, C, min(r, N)] into N candidates: the top-``r`` scores per row by the rule
    of `select_top_r` (ties: the earlier position wins), listed in ascending position.

    Candidates are (score, global position) pairs gathered from anywhere, e.g. each rank's
    own best r; invalid candidates carry score -inf and come last. Because the top r of a
    union is the top r of the union of each part's top r, merging the parts' winners gives
    exactly `select_top_r` over the whole pool.
    """
    rk = min(r, scores_BGCN.shape[-1])
    by_pos = positions_BGCN.argsort(dim=-1, stable=True)
    scores = scores_BGCN.gather(-1, by_pos)
    by_score = (-scores).argsort(dim=-1, stable=True)[..., :rk]  # stable: equal scores keep position order
    chosen = by_pos.gather(-1, by_score)
    valid = scores.gather(-1, by_score) != float("-inf")
    key = torch.where(valid, positions_BGCN.gather(-1, chosen), torch.iinfo(torch.long).max)
    return chosen.gather(-1, key.argsort(dim=-1, stable=True))


@torch.no_grad()
def retrieve(
    query_end_BCGHD: torch.Tensor,
    pool_k_BTGD: torch.Tensor,
    pool_v_BTGD: torch.Tensor,
    valid_len_C: torch.Tensor,
    r: int,
    group_reduce: str = "sum",
    details: bool = False,
):
    """Retrieve R_{i-1} for C segment boundaries at once.

    query_end_BCGHD: the un-rotated segment-end query of each boundary, per KV group and
        query head of the group (H here: heads per group).
    pool_*_BTGD:    un-rotated pool keys/values; row c may use the first valid_len_C[c].
    group_reduce:   "sum" adds the heads' scores (one dot product with the summed query),
        "max" takes the largest head score.
    Returns keys and values [B, C, R', G, D] (detached, original order) and the number of
    valid retrieved tokens per row [C] (= min(r, valid_len_C)); with ``details`` also the
    picked positions [B, G, C, R'] and the margin [B, G, C] between the R-th and (R+1)-th
    best score (NaN where a row has no (R+1)-th candidate).
    """
    scores = retrieval_scores(query_end_BCGHD, pool_k_BTGD, group_reduce)
    idx_BGCR = select_top_r(scores, valid_len_C, r)
    b, g, c, rk = idx_BGCR.shape
    d = pool_k_BTGD.shape[-1]
    idx_BCRG = idx_BGCR.permute(0, 2, 3, 1)  # [B, C, R', G]
    gather_idx = idx_BCRG.reshape(b, c * rk, g, 1).expand(b, c * rk, g, d)
    keys = torch.gather(pool_k_BTGD.detach(), 1, gather_idx).reshape(b, c, rk, g, d)
    values = torch.gather(pool_v_BTGD.detach(), 1, gather_idx).reshape(b, c, rk, g, d)
    count_C = torch.clamp(valid_len_C, max=r)
    if not details:
        return keys, values, count_C
    t = scores.shape[-1]
    valid = torch.arange(t, device=scores.device) < valid_len_C.to(scores.device)[:, None]
    top = scores.masked_fill(~valid, float("-inf")).topk(min(r + 1, t), dim=-1).values
    margin = top[..., r - 1] - top[..., r] if top.shape[-1] > r else torch.full(top.shape[:-1], float("nan"))
    margin = margin.masked_fill(~(valid_len_C.to(scores.device) > r), float("nan"))
    return keys, values, count_C, idx_BGCR, margin


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
