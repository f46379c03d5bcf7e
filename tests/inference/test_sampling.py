"""Greedy, temperature, top-k and top-p selection."""
import math

import pytest
import torch

from megaseg.config import ConfigError
from megaseg.inference.sampling import SamplingConfig, filter_logits, sample


def test_greedy_is_argmax_with_ties_to_the_lower_id():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    assert sample(logits, SamplingConfig()).tolist() == [1, 3]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0]])
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=3)))[0]
    assert kept.tolist() == [False, True, False, True, True]


@pytest.mark.parametrize("top_p, allowed", [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus_that_reaches_p(top_p, allowed):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=top_p)))[0]
    assert {i for i, k in enumerate(kept.tolist()) if k} == allowed


def test_samples_never_leave_the_filtered_set_and_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(4000, 6)
    cfg = SamplingConfig(temperature=0.7, top_k=4, top_p=0.95, seed=0)
    draws = sample(logits, cfg, cfg.generator())
    allowed = torch.isfinite(filter_logits(logits[:1], cfg))[0]
    assert allowed[draws].all()
    expected = filter_logits(logits[:1], cfg).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    # 4000 draws: each frequency within ~5 standard errors of its probability.
    tol = 5 * torch.sqrt(expected * (1 - expected) / draws.numel()) + 1e-9
    assert ((freq - expected).abs() <= tol).all()


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 0.0]])
    p_cold = filter_logits(logits, SamplingConfig(temperature=0.5)).softmax(-1)[0, 0].item()
    p_hot = filter_logits(logits, SamplingConfig(temperature=2.0)).softmax(-1)[0, 0].item()
    assert math.isclose(p_cold, 1 / (1 + math.exp(-2.0)), rel_tol=1e-6)
    assert math.isclose(p_hot, 1 / (1 + math.exp(-0.5)), rel_tol=1e-6)


def test_same_seed_same_draws():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0, seed=3)
    assert torch.equal(sample(logits, cfg, cfg.generator()), sample(logits, cfg, cfg.generator()))


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**kwargs)
