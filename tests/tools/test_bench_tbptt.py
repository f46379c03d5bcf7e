"""tools/bench_tbptt.py: the FLOP formula behind the CPU MFU."""
import argparse
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_tbptt", REPO / "tools" / "bench_tbptt.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(**kw):
    base = dict(segment=16, tail=4, retrieval=6, layers=3, hidden=32, heads=2, vocab=50, long_range_layers=[1],
                long_heads=1)
    return argparse.Namespace(**{**base, **kw})


def test_one_segment_is_full_attention_and_has_no_extra_backward():
    a = _args()
    seg = bench.step_flops(bench.model_config(a, 16, True), 16, True)
    full = bench.step_flops(bench.model_config(a, 16, False), 16, False)
    assert seg == full
    assert seg["executed"] == seg["model"] == 3 * seg["forward"]


def test_counts_by_hand():
    a = _args()
    T, M, R = 40, 4, 6  # S = 16
    cfg = bench.model_config(a, T, True)
    E, F, V, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim, cfg.num_layers
    dense_per_token = E * (2 * D + 2 * 2 * D) + 2 * D * E + 3 * E * F  # H = G = 2
    segs = [(0, 16), (16, 16), (32, 8)]
    fwd = 2 * T * E * V
    layer_fwd = []
    for i, (start, n) in enumerate(segs):
        per_layer = []
        for layer in range(L):
            # Group 0 is retrieval in layer 1 and segment elsewhere; group 1 is local.
            p0 = 0 if i == 0 else (min(R, start) if layer == 1 else 0)
            p1 = 0 if i == 0 else M
            pairs = 2 * n * (n + 1) / 2 + n * (p0 + p1)
            per_layer.append(2 * n * dense_per_token + 4 * D * pairs)
        layer_fwd.append(per_layer)
        fwd += sum(per_layer)
    extra = sum(2 * sum(layer_fwd[i][: L - 1]) for i in range(len(segs) - 1))
    got = bench.step_flops(cfg, T, True, k=1)
    assert abs(got["forward"] - fwd) < 1e-6 * fwd
    assert abs(got["executed"] - (3 * fwd + extra)) < 1e-6 * fwd
    assert bench.step_flops(cfg, T, True, k=0)["executed"] == got["model"]
