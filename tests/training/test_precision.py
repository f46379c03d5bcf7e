"""bf16 autocast: on only where the hardware supports it; a bf16 step trains like fp32."""
import pytest
import torch

from megaseg.config import ConfigError
from megaseg.training import precision
from megaseg.training.batches import rank_microbatches
from megaseg.training.precision import resolve_bf16
from megaseg.training.engines import select_engine, train_step
from megaseg.training.setup import setup_model_and_optimizer
from tests.training.synthetic import PatternDataset, tiny_config


def test_auto_is_fp32_on_cpu_and_explicit_bf16_needs_hardware_support(monkeypatch):
    if not torch.cuda.is_available():
        assert resolve_bf16(None) is False
    assert resolve_bf16(False) is False
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="bf16=True is invalid"):
        resolve_bf16(True)
    monkeypatch.setattr(precision, "bf16_supported", lambda: True)
    assert resolve_bf16(True) is True


def test_bf16_autocast_step_matches_fp32_loss_closely(model_parallel):
    data = PatternDataset(8, 32)
    losses = {}
    for bf16 in (False, True):
        cfg = tiny_config()
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
        metrics = train_step(select_engine(cfg, model, bf16=bf16), optimizer, scheduler, rank_microbatches(data, 0, cfg))
        losses[bf16] = metrics.loss
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[True] != losses[False]  # autocast really ran in bf16
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
