"""Top-R retrieval (docs/semantics.md §4) against a brute-force sort."""
import pytest
import torch

from megaseg.ops.retrieval import retrieve, select_top_r, merge_top_r


def _brute(scores_T, valid, r):
    order = sorted(range(valid), key=lambda t: (-scores_T[t], t))  # ties: earlier position first
    return sorted(order[:r])


@pytest.mark.parametrize("seed", range(5))
def test_select_top_r_is_exact_with_ties_and_in_original_order(seed):
    g = torch.Generator().manual_seed(seed)
    B, G, C, T, r = 2, 3, 4, 23, 6
    # Few distinct values -> many ties at the threshold.
    scores = torch.randint(0, 4, (B, G, C, T), generator=g).double()
    valid = torch.tensor([3, 9, 16, 23])
    idx = select_top_r(scores, valid, r)
    assert idx.shape == (B, G, C, r)
    for b in range(B):
        for gg in range(G):
            for c in range(C):
                want = _brute(scores[b, gg, c].tolist(), int(valid[c]), r)
                got = idx[b, gg, c].tolist()[: len(want)]
                assert got == want


def test_retrieve_scores_with_summed_group_queries_and_counts():
    g = torch.Generator().manual_seed(0)
    B, C, T, G, D, r = 1, 2, 10, 1, 4, 3
    q = torch.randn(B, C, G, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, G, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, G, D, generator=g, dtype=torch.float64)
    valid = torch.tensor([2, 10])
    keys, values, count = retrieve(q, k, v, valid, r)
    assert count.tolist() == [2, 3]
    for c in range(C):
        scores = (k[0, :, 0] @ q[0, c, 0, 0]).tolist()
        want = _brute(scores, int(valid[c]), r)
        torch.testing.assert_close(keys[0, c, : len(want), 0], k[0, want, 0])
        torch.testing.assert_close(values[0, c, : len(want), 0], v[0, want, 0])
    assert not keys.requires_grad


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_group_heads_combine_by_sum_or_max(reduce):
    g = torch.Generator().manual_seed(1)
    B, C, T, G, H, D, r = 1, 1, 12, 2, 3, 4, 4
    q = torch.randn(B, C, G, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, G, D, generator=g, dtype=torch.float64)
    keys, _, _ = retrieve(q, k, k, torch.tensor([T]), r, reduce)
    for gg in range(G):
        per_head = k[0, :, gg] @ q[0, 0, gg].T  # [T, H]
        scores = (per_head.sum(1) if reduce == "sum" else per_head.amax(1)).tolist()
        torch.testing.assert_close(keys[0, 0, :, gg], k[0, _brute(scores, T, r), gg])


@pytest.mark.parametrize("seed", range(4))
def test_merging_each_parts_top_r_is_select_top_r_over_the_whole_pool(seed):
    """The distributed top-R of context parallelism: split the pool into parts, keep each
    part's top R (as (score, global position) candidates), merge: the same picks in the same
    order as select_top_r over the whole pool, ties included, also for rows with fewer than
    R valid tokens."""
    g = torch.Generator().manual_seed(seed)
    B, G, C, T, R = 2, 3, 5, 40, 6
    scores = torch.randint(0, 4, (B, G, C, T), generator=g).float()  # many ties
    valid_len = torch.tensor([3, 9, 17, 30, 40])
    want = select_top_r(scores, valid_len, R)
    cuts = [0, 7, 8, 21, 40]
    cand_s, cand_p = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part_valid = (valid_len - a).clamp(0, b - a)
        idx = select_top_r(scores[..., a:b], part_valid, R)
        s = scores[..., a:b].gather(-1, idx).masked_fill(idx >= part_valid[:, None], float("-inf"))
        cand_s.append(s)
        cand_p.append(idx + a)
    cand_s, cand_p = torch.cat(cand_s[::-1], -1), torch.cat(cand_p[::-1], -1)  # any order of parts
    picked = cand_p.gather(-1, merge_top_r(cand_s, cand_p, R))
    for c, n in enumerate(valid_len.clamp(max=R).tolist()):
        assert torch.equal(picked[:, :, c, :n], want[:, :, c, :n]), c


def test_nan_scores_rank_lowest_and_indices_stay_in_range():
    """A diverged forward (NaN scores) must not index outside the pool: the trainer then
    sees the non-finite loss and skips the step."""
    scores = torch.randn(1, 2, 3, 10)
    scores[0, 0, 1, :] = float("nan")
    scores[0, 1, 2, 4] = float("nan")
    idx = select_top_r(scores, torch.tensor([4, 10, 10]), 3)
    assert int(idx.max()) < 10 and int(idx.min()) >= 0
    finite = scores[0, 1, 2].nan_to_num(nan=float("-inf"))
    assert idx[0, 1, 2].tolist() == sorted(finite.topk(3).indices.tolist())
