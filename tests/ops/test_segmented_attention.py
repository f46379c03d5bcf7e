"""The segmented operator against docs/semantics.md, one layer at a time."""
import random

import pytest
import torch
import torch.nn.functional as F

from megaseg.config import LOCAL, MODES, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops.rope import inv_frequencies
from megaseg.ops.segmented_attention import LayerState, SegmentedAttention
from tests.naive_semantics import naive_layer, rotate


def _qkv(B, T, H, G, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, G, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, G, D, generator=g, dtype=dtype)
    return q, k, v


def _op(modes, S, M, R, D=8, hpg=2, rope=RopeConfig(theta=500.0), reduce="sum"):
    return SegmentedAttention(modes, SegmentConfig(S, M, R, 1, reduce), rope, D, hpg)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_sequence_within_one_segment_is_causal_sdpa(T):
    S, D, hpg, G = 16, 8, 2, 3
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, 4, 6, D, hpg)
    q, k, v = _qkv(2, T, G * hpg, G, D, seed=T, dtype=torch.float32)
    out, _ = op(q, k, v)
    pos = torch.arange(T)
    qr, kr = op.rotary(q, pos), op.rotary(k, pos)
    ref = F.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.repeat_interleave(hpg, 2).transpose(1, 2), v.repeat_interleave(hpg, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_operator_matches_naive_semantics(seed):
    rng = random.Random(seed)
    S = rng.choice([4, 5, 8])
    M = rng.randint(0, S)
    R = rng.randint(1, 2 * S)
    G, hpg, D = rng.choice([(3, 2, 4), (2, 1, 6), (4, 2, 4)])
    modes = tuple(rng.choice(MODES) for _ in range(G))
    T = rng.randint(2 * S + 1, 4 * S - 1)  # uneven last segment, several boundaries
    reduce = ("sum", "max")[seed % 2]
    op = _op(modes, S, M, R, D, hpg, reduce=reduce)
    q, k, v = _qkv(2, T, G * hpg, G, D, seed)
    out, _ = op(q, k, v)
    ref = naive_layer(q, k, v, modes, S, M, R, inv_frequencies(RopeConfig(theta=500.0), D), reduce)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_chunked_calls_equal_one_pass_and_keep_bounded_state():
    S, M, R, G, hpg, D = 6, 2, 4, 3, 2, 4
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, M, R, D, hpg)
    T = 41
    q, k, v = _qkv(2, T, G * hpg, G, D, seed=7)
    full, _ = op(q, k, v)
    for chunks in ([1] * T, [S] * 6 + [5], [5, 1, 13, 2, 20]):
        assert sum(chunks) == T
        state, outs, s = None, [], 0
        for n in chunks:
            o, state = op(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], state)
            outs.append(o)
            s += n
            assert state.tokens == s
            assert (state.open_k.shape[1] if state.open_k is not None else 0) == s % S
            if s >= S:
                assert state.tail_k.shape[1] == M and state.tail_k.shape[2] == 1  # local groups only
                assert state.ret_k.shape[1] == min(R, (s // S) * S) and state.ret_k.shape[2] == 1
                assert state.pool_k.shape[1] == (s // S) * S
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_retrieved_prefix_and_pool_are_detached_tail_is_not():
    op = _op((LOCAL, RETRIEVAL), 4, 2, 3, 4, 1)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 11, 2, 2, 4, seed=3))
    _, state = op(q, k, v)
    assert state.tail_k.requires_grad and state.tail_v.requires_grad
    for t in (state.ret_k, state.ret_v, state.pool_k, state.pool_v):
        assert not t.requires_grad


def test_retrieval_gradient_is_forward_only():
    """Only retrieval crosses segments here: segment 1's output depends on segment 0's keys
    in value, but receives no gradient through them."""
    S = 4
    op = _op((RETRIEVAL, SEGMENT), S, 0, 3, 4, 1)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2 * S, 2, 2, 4, seed=5))
    out, _ = op(q, k, v)
    out[:, S:].sum().backward()
    assert k.grad[:, :S].abs().max() == 0 and v.grad[:, :S].abs().max() == 0
    with torch.no_grad():
        v2 = v.clone()
        v2[:, :S] += 1.0
        out2, _ = op(q, k, v2)
    assert (out2[:, S:, 0] - out[:, S:, 0]).abs().max() > 1e-3  # the retrieval head reads segment 0


def test_local_with_full_tail_equals_block_local_mask():
    """docs/semantics.md §7: all heads local, M = S: each token sees the previous segment fully."""
    S, G, hpg, D, T = 5, 2, 2, 8, 23
    op = _op((LOCAL, LOCAL), S, S, 0, D, hpg)
    q, k, v = _qkv(1, T, G * hpg, G, D, seed=11)
    out, _ = op(q, k, v)
    pos = torch.arange(T)
    seg = pos // S
    mask = (pos[None, :] <= pos[:, None]) & (seg[None, :] >= seg[:, None] - 1)
    qr, kr = op.rotary(q, pos), op.rotary(k, pos)  # RoPE is relative: absolute positions suffice
    ref = F.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.repeat_interleave(hpg, 2).transpose(1, 2), v.repeat_interleave(hpg, 2).transpose(1, 2),
        attn_mask=mask,
    ).transpose(1, 2)
    # fp32 rotary angles make relative invariance exact only to fp32 rounding
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_rotary_positions_never_exceed_segment_plus_prefix():
    S, M, R = 8, 3, 6
    op = _op((LOCAL, RETRIEVAL, SEGMENT), S, M, R, 4, 1)
    seen = []
    orig, orig_from = op.rotary.forward, op.rotary.rotate_from

    def spy(x, positions):
        seen.append(int(positions.max()))
        return orig(x, positions)

    def spy_from(x, start):
        seen.append(start + x.shape[-3] - 1)
        return orig_from(x, start)

    op.rotary.forward, op.rotary.rotate_from = spy, spy_from
    q, k, v = _qkv(1, 20 * S + 3, 3, 3, 4, seed=2)
    op(q, k, v)
    state = None
    for t in range(5 * S):  # decode path too
        _, state = op(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
    assert max(seen) == S + max(M, R) - 1 == SegmentConfig(S, M, R).max_rope_position


def test_rope_matches_independent_rotation():
    rope = RopeConfig(theta=10000.0, scaling_type="llama3", factor=8.0, original_max_position_embeddings=64)
    op = SegmentedAttention((LOCAL,), SegmentConfig(4, 1, 0), rope, 16, 1)
    x = torch.randn(1, 7, 1, 16, dtype=torch.float64)
    pos = torch.tensor([0, 3, 9, 17, 40, 63, 100])
    got = op.rotary(x, pos)
    inv = inv_frequencies(rope, 16)
    want = torch.stack([rotate(x[0, i, 0], int(p), inv) for i, p in enumerate(pos)])
    torch.testing.assert_close(got[0, :, 0], want, rtol=0, atol=1e-12)


def test_state_must_match_open_segment():
    op = _op((LOCAL,), 4, 1, 0, 4, 1)
    q, k, v = _qkv(1, 1, 1, 1, 4, seed=0)
    with pytest.raises(ValueError, match="open segment"):
        op(q, k, v, LayerState(tokens=2))
