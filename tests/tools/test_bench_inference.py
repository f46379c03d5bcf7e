"""tools/bench_inference.py: the stock peer runs on megaseg's weights, the plot is optional."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_inference", REPO / "tools" / "bench_inference.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(**kw):
    base = dict(vocab=101, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, segment=16, tail=4,
                retrieval=4, long_range_layers=[1], long_heads=1)
    return argparse.Namespace(**{**base, **kw})


def test_stock_peer_has_megasegs_weights_and_batched_decode_is_exact():
    args = _args()
    runners = bench._same_weight_runners(args, 12)
    (_, seg), (_, full) = runners["megaseg"], runners["full"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (n,), generator=g) for n in (12, 9, 5)]
    with torch.no_grad():
        # T <= S: segmented attention is plain causal attention, so the logits agree.
        torch.testing.assert_close(seg.prefill(prompts[0]), full.prefill(prompts[0]), rtol=0, atol=1e-5)
        a = seg.prefill_batch(prompts)
        b = full.prefill_batch(prompts)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        token = a.argmax(-1)
        for _ in range(6):  # the 12-token row crosses S = 16 while decoding
            a, b = seg.decode_batch(token), full.decode_batch(token)
            assert (a - b)[1:].abs().max().item() <= 1e-5  # rows that stay inside one segment
            token = a.argmax(-1)


def test_plot_without_matplotlib_is_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench._plot([], tmp_path / "x.png", _args()) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()
