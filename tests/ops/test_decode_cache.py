"""The operator's decode path: preallocated per-segment buffers, exact against one pass."""
import pytest
import torch

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops.segmented_attention import LayerState, SegmentedAttention


def _qkv(B, T, H, G, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, n, D, generator=g, dtype=dtype) for n in (H, G, G))


def _op(modes, S, M, R, D=8, hpg=2):
    return SegmentedAttention(modes, SegmentConfig(S, M, R, 1), RopeConfig(theta=500.0), D, hpg)


@pytest.mark.parametrize("modes,S,M,R", [
    ((LOCAL, RETRIEVAL, SEGMENT), 6, 2, 4),
    ((LOCAL, LOCAL), 5, 5, 0),          # tail = whole segment, no mask needed
    ((RETRIEVAL, SEGMENT), 4, 0, 9),    # retrieved prefix grows over several segments
    ((SEGMENT,), 3, 0, 0),              # no prefix at all
])
def test_token_by_token_equals_one_pass_across_boundaries(modes, S, M, R):
    G, hpg, D = len(modes), 2, 8
    op = _op(modes, S, M, R, D, hpg)
    T = 4 * S + 2
    q, k, v = _qkv(2, T, G * hpg, G, D, seed=S)
    full, _ = op(q, k, v)
    state, outs = None, []
    with torch.no_grad():
        for t in range(T):
            o, state = op.decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
            outs.append(o)
            assert state.tokens == t + 1
            open_len = 0 if state.open_k is None else state.open_k.shape[1]
            assert open_len == (t + 1) % S
            if open_len:
                # The state's open KV are the un-rotated inputs, held in the segment buffer.
                torch.testing.assert_close(state.open_k, k[:, t + 1 - open_len : t + 1], rtol=0, atol=0)
                assert state.open_k.data_ptr() == state.cache.k_open.data_ptr()
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_buffers_are_allocated_once_per_segment():
    S, G, hpg, D = 8, 3, 2, 4
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, 3, 5, D, hpg)
    q, k, v = _qkv(1, 3 * S, G * hpg, G, D, seed=1)
    state, ptrs = None, {}
    with torch.no_grad():
        for t in range(3 * S):
            _, state = op.decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
            if state.cache is not None and state.open_k is not None:
                ptrs.setdefault(t // S, set()).add(state.cache.k_rot.data_ptr())
    assert sorted(ptrs) == [0, 1, 2]
    assert all(len(p) == 1 for p in ptrs.values())


def test_decode_continues_a_prefill_that_ends_inside_a_segment():
    S, G, hpg, D = 6, 3, 2, 4
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, 2, 4, D, hpg)
    T = 3 * S + 1
    q, k, v = _qkv(2, T, G * hpg, G, D, seed=3)
    full, _ = op(q, k, v)
    with torch.no_grad():
        p = S + 4  # the prompt leaves an open segment of 4 tokens
        out, state = op(q[:, :p], k[:, :p], v[:, :p])
        outs = [out]
        for t in range(p, T):
            o, state = op.decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_two_continuations_of_one_state_do_not_share_buffers():
    S, G, hpg, D = 8, 2, 2, 4
    op = _op((LOCAL, RETRIEVAL), S, 2, 4, D, hpg)
    q, k, v = _qkv(1, S + 5, G * hpg, G, D, seed=5)
    q2, k2, v2 = _qkv(1, 2, G * hpg, G, D, seed=6)
    with torch.no_grad():
        base = None
        for t in range(S + 3):
            _, base = op.decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], base)
        # Branch a continues with the original tokens, branch b with others, both from `base`.
        oa, sa = op.decode(q[:, S + 3 : S + 4], k[:, S + 3 : S + 4], v[:, S + 3 : S + 4], base)
        ob, sb = op.decode(q2[:, :1], k2[:, :1], v2[:, :1], base)
        oa2, _ = op.decode(q[:, S + 4 : S + 5], k[:, S + 4 : S + 5], v[:, S + 4 : S + 5], sa)
    full, _ = op(q, k, v)
    torch.testing.assert_close(torch.cat([oa, oa2], 1), full[:, S + 3 : S + 5], rtol=0, atol=1e-12)
    qb = torch.cat([q[:, : S + 3], q2[:, :1]], 1)
    kb = torch.cat([k[:, : S + 3], k2[:, :1]], 1)
    vb = torch.cat([v[:, : S + 3], v2[:, :1]], 1)
    ref_b, _ = op(qb, kb, vb)
    torch.testing.assert_close(ob, ref_b[:, -1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(sb.open_k, kb[:, S:], rtol=0, atol=0)


def test_decode_with_gradient_takes_the_run_path():
    S, G, hpg, D = 4, 2, 1, 4
    op = _op((LOCAL, SEGMENT), S, 2, 0, D, hpg)
    q, k, v = _qkv(1, S + 2, G * hpg, G, D, seed=8)
    q.requires_grad_(True)
    state, outs = None, []
    for t in range(S + 2):
        o, state = op(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
        outs.append(o)
    torch.cat(outs, 1).sum().backward()
    assert q.grad is not None and state.cache is None


def test_decode_is_asked_for_forward_of_one_token_stays_the_run_path():
    """Only `decode` uses the buffers; `forward` of one token under no_grad is the run path
    and gives the same output and state."""
    S, G, hpg, D = 4, 3, 2, 4
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, 2, 3, D, hpg)
    q, k, v = _qkv(2, 2 * S + 1, G * hpg, G, D, seed=9)
    with torch.no_grad():
        run = dec = None
        for t in range(2 * S + 1):
            o_run, run = op(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], run)
            o_dec, dec = op.decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], dec)
            assert run.cache is None
            torch.testing.assert_close(o_dec, o_run, rtol=0, atol=1e-12)
            for name, t_run in run.tensors().items():
                torch.testing.assert_close(getattr(dec, name), t_run, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one new token per row"):
        op.decode(q[:, :2], k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="inference only"):
        op.decode(q[:, :1].requires_grad_(True), k[:, :1], v[:, :1])


def test_rows_at_different_positions_equal_one_pass_per_row():
    S, M, R, G, hpg, D = 5, 2, 4, 3, 2, 4
    modes = (LOCAL, RETRIEVAL, SEGMENT)
    op = _op(modes, S, M, R, D, hpg)
    starts = [0, 3, 7, 11]  # rows enter decode at different offsets and segments
    steps = 3 * S + 1
    seqs = [_qkv(1, n + steps, G * hpg, G, D, seed=20 + i) for i, n in enumerate(starts)]
    with torch.no_grad():
        row_states = []
        for (q, k, v), n in zip(seqs, starts):
            row_states.append(op(q[:, :n], k[:, :n], v[:, :n])[1] if n else LayerState())
        rs = op.rows_state(row_states, seqs[0][1])
        outs = []
        for t in range(steps):
            qs = torch.cat([q[:, n + t : n + t + 1] for (q, _, _), n in zip(seqs, starts)])
            ks = torch.cat([k[:, n + t : n + t + 1] for (_, k, _), n in zip(seqs, starts)])
            vs = torch.cat([v[:, n + t : n + t + 1] for (_, _, v), n in zip(seqs, starts)])
            outs.append(op.decode_rows(qs, ks, vs, rs))
    out = torch.cat(outs, 1)
    for b, ((q, k, v), n) in enumerate(zip(seqs, starts)):
        full, end = op(q, k, v)
        torch.testing.assert_close(out[b : b + 1], full[:, n:], rtol=0, atol=1e-12)
        row = op.rows_row(rs, b)
        assert row.tokens == end.tokens
        for name, t in end.tensors().items():
            torch.testing.assert_close(getattr(row, name), t, rtol=0, atol=0)


def test_rotation_from_a_table_slice_equals_the_gather():
    from megaseg.ops.rope import Rotary

    rot = Rotary(RopeConfig(theta=500.0), 8)
    x = torch.randn(2, 3, 7, 4, 8, dtype=torch.float64)
    for start in (0, 5, 130):
        pos = torch.arange(start, start + 7).expand(3, 7)
        torch.testing.assert_close(rot.rotate_from(x, start), rot(x, pos), rtol=0, atol=0)
