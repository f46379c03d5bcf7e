"""Each inference mode's attention equals softmax attention under an explicit mask and
explicit RoPE positions, written here token pair by token pair; any chunking gives the
same output."""
import math

import pytest
import torch

from megaseg.config import RopeConfig, SegmentConfig
from megaseg.eval.baselines import BaselineAttention
from megaseg.ops.rope import Rotary
from megaseg.ops.segmented_attention import SegmentedAttention

ROPE = RopeConfig(theta=100.0)
T, H, G, D = 19, 4, 2, 8
S_SINK, W = 2, 5
SEG = 6


def rule(mode, t, a):
    """(allowed, query position, key position) for query t and key a."""
    if mode == "full":
        return a <= t, t, a
    if mode == "window":
        if a < S_SINK:
            return a <= t, min(t, S_SINK + W - 1), a
        return a <= t and t - a < W, t, a
    if mode == "segment":
        return a <= t and a // SEG == t // SEG, t % SEG, a % SEG
    if mode == "local":  # megaseg `local`, M = 3: own segment + last 3 tokens of the previous one
        ok = a <= t and (a // SEG == t // SEG or (a // SEG == t // SEG - 1 and a >= (t // SEG) * SEG - 3))
        return ok, t, a  # true relative distances (docs/semantics.md §3)
    raise ValueError(mode)


def reference(q, k, v, modes, hpg):
    rot = Rotary(ROPE, D)
    out = torch.zeros_like(q)
    for h in range(q.shape[2]):
        g = h // hpg
        for t in range(q.shape[1]):
            scores, vals = [], []
            for a in range(k.shape[1]):
                ok, pq, pk = rule(modes[g], t, a)
                if ok:
                    qr = rot(q[0, t, h].view(1, 1, D), torch.tensor([pq]))[0, 0]
                    kr = rot(k[0, a, g].view(1, 1, D), torch.tensor([pk]))[0, 0]
                    scores.append(qr @ kr / math.sqrt(D))
                    vals.append(v[0, a, g])
            p = torch.softmax(torch.stack(scores), 0)
            out[0, t, h] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, T, H, D, generator=g, dtype=torch.float64) * 2,
            torch.randn(1, T, G, D, generator=g, dtype=torch.float64) * 2,
            torch.randn(1, T, G, D, generator=g, dtype=torch.float64))


def run_chunks(core, q, k, v, sizes):
    outs, state, start = [], None, 0
    for n in sizes:
        o, state = core(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], state)
        outs.append(o)
        start += n
    assert start == q.shape[1]
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("modes", [("full", "full"), ("window", "window"), ("full", "window"), ("segment", "full"),
                                   ("window", "segment")], ids=["full", "streaming", "duo", "cut", "window+cut"])
def test_baseline_modes_equal_explicit_mask(modes):
    q, k, v = qkv()
    core = BaselineAttention(modes, ROPE, D, H // G, sinks=S_SINK, window=W, segment_length=SEG)
    ref = reference(q, k, v, modes, H // G)
    for sizes in ([T], [1] * T, [4, 7, 1, 7], [10, 9]):
        out, state = run_chunks(core, q, k, v, sizes)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # What a streaming group keeps is bounded: sinks + window - 1 tokens.
    if modes == ("window", "window"):
        assert state.sink_k.shape[1] == S_SINK and state.win_k.shape[1] == W - 1 and state.full_k is None


def test_megaseg_local_segment_mode_equals_explicit_mask():
    q, k, v = qkv(1)
    core = SegmentedAttention(("local", "segment"), SegmentConfig(SEG, 3, 0, 1), ROPE, D, H // G).double()
    out, _ = run_chunks(core, q, k, v, [T])
    # The operator re-indexes positions per segment, the reference uses true positions:
    # equal scores up to the fp32 rotary tables.
    torch.testing.assert_close(out, reference(q, k, v, ("local", "segment"), H // G), rtol=1e-5, atol=1e-6)


def test_full_mode_equals_megaseg_with_one_segment():
    q, k, v = qkv(2)
    seg = SegmentedAttention(("local", "local"), SegmentConfig(64, 0, 0, 1), ROPE, D, H // G).double()
    full = BaselineAttention(("full", "full"), ROPE, D, H // G)
    torch.testing.assert_close(run_chunks(full, q, k, v, [5, 14])[0], seg(q, k, v)[0], rtol=1e-9, atol=1e-10)


def test_segment_cut_with_tail_is_megaseg_local_mask():
    q, k, v = qkv(3)
    core = BaselineAttention(("segment", "full"), ROPE, D, H // G, segment_length=SEG, tail=3)
    ref = reference(q, k, v, ("local", "full"), H // G)
    for sizes in ([T], [1] * T, [4, 7, 1, 7]):
        torch.testing.assert_close(run_chunks(core, q, k, v, sizes)[0], ref, rtol=1e-9, atol=1e-10)
