"""The training memory model's activation terms are what autograd actually saves: per
token, the census of saved tensors (unique storages) of a chunk forward equals the
model's terms for every recompute mode; and its model-state part follows the formulas of
docs/parallelism.md."""
import argparse

import pytest

from megaseg.training.memory_model import (TrainingLayout, activation_bytes_per_token, predict_training_memory,
                                           stage_parameters)
from megaseg.inference.memory_model import parameter_count


def _model(hidden=64, heads=2, segment=64):
    from tools.bench_cp import add_step_model_args, step_model

    p = argparse.ArgumentParser()
    add_step_model_args(p)
    p.add_argument("--quick", action="store_true")
    return step_model(p.parse_args(["--hidden", str(hidden), "--heads", str(heads), "--vocab", "256", "--segment",
                                    str(segment), "--tail", "16", "--retrieval", "16", "--layers", "2",
                                    "--long-range-layers", "1"]))


@pytest.mark.parametrize("shape", [dict(), dict(hidden=96, heads=3, segment=32)], ids=["h64", "h96"])
def test_activation_terms_match_the_saved_tensor_census(model_parallel, shape):
    from tools.bench_recompute import census

    cfg = _model(**shape)
    S = cfg.segment.segment_length
    terms = activation_bytes_per_token(cfg, TrainingLayout(seq_length=3 * S))
    expected = {"none": terms["rest"] + terms["core"] + terms["loss"], "selective": terms["rest"] + terms["loss"],
                "full": terms["inputs"]}
    for setting, want in expected.items():
        # the marginal per-token bytes of one more segment: no mask (shared), no parameters
        got = (3 * census(cfg, 3 * S, setting) - 2 * census(cfg, 2 * S, setting))
        assert got == pytest.approx(want, rel=0.06), (setting, got, want)


def test_model_state_follows_the_formulas():
    cfg = _model()
    phi = parameter_count(cfg)
    one = predict_training_memory(cfg, TrainingLayout(seq_length=256))
    assert (one.weights, one.grads, one.optimizer) == (4 * phi, 4 * phi, 8 * phi)
    sharded = predict_training_memory(cfg, TrainingLayout(seq_length=256, dp=2, cp=2, distributed_optimizer=True))
    assert sharded.optimizer == 8 * phi // 4
    assert stage_parameters(cfg, tp=2) == phi // 2
    assert stage_parameters(cfg, pp=2) < phi


def test_recompute_and_context_parallelism_shrink_the_activations():
    cfg = _model()
    T = 16 * cfg.segment.segment_length

    def act(**kw):
        est = predict_training_memory(cfg, TrainingLayout(seq_length=T, **kw))
        return est.activations + est.transient

    assert act(recompute="full", cp=2) < act(recompute="selective", cp=2) < act(cp=2) < act(step_engine="chunk")
    assert act(recompute="full") < act()
    assert act(cp=4) < act(cp=2)


@pytest.mark.parametrize("bad", [dict(recompute="layernorm"), dict(kernel="flash"), dict(cp=0),
                                 dict(step_engine="windows")])
def test_bad_layouts_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainingLayout(seq_length=64, **bad)
