"""LR warmup + decay values, and gradient accumulation equivalence."""
import math

import pytest
import torch

from megaseg.training.batches import rank_microbatches
from megaseg.training.engines import SequentialEngine, select_engine, train_step
from megaseg.training.setup import setup_model_and_optimizer
from tests.training.synthetic import PatternDataset, tiny_config

TRAIN = PatternDataset(16, 32, seed=0)


def _lrs(cfg, steps):
    _, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        scheduler.step(increment=cfg.global_batch_size)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_linear_warmup_then_cosine_decay_to_min_lr(model_parallel):
    cfg = tiny_config(lr=1e-2, min_lr=1e-3, lr_warmup_init=0.0, lr_warmup_iters=4, train_iters=20,
                      lr_decay_style="cosine")
    lrs = _lrs(cfg, 22)
    for step in range(5):
        assert lrs[step] == pytest.approx(1e-2 * step / 4)
    for step in range(4, 21):
        ratio = (step - 4) / 16
        assert lrs[step] == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi * ratio)) * 9e-3)
    assert lrs[12] == pytest.approx(5.5e-3)  # halfway through the decay
    assert lrs[20] == pytest.approx(1e-3) and lrs[22] == pytest.approx(1e-3)  # stays at min_lr after


def test_lr_decay_iters_and_linear_and_constant_styles(model_parallel):
    linear = _lrs(tiny_config(lr=1e-2, min_lr=0.0, lr_warmup_iters=0, train_iters=10, lr_decay_iters=5,
                              lr_decay_style="linear"), 6)
    assert linear == pytest.approx([1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 0.0, 0.0])
    fraction = _lrs(tiny_config(lr=1e-2, min_lr=0.0, lr_warmup_iters=None, lr_warmup_fraction=0.2, train_iters=10,
                                lr_decay_style="constant"), 3)
    assert fraction == pytest.approx([0.0, 5e-3, 1e-2, 1e-2])  # 20% of 10 steps = 2 warmup steps
    constant = _lrs(tiny_config(lr=1e-2, min_lr=0.0, lr_warmup_iters=2, lr_warmup_init=2e-3,
                                lr_decay_style="constant"), 4)
    assert constant == pytest.approx([2e-3, 6e-3, 1e-2, 1e-2, 1e-2])


def _grads_after_one_batch(micro_batch_size):
    cfg = tiny_config(micro_batch_size=micro_batch_size, global_batch_size=4)
    model, optimizer, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    model.zero_grad_buffer()
    microbatches = rank_microbatches(TRAIN, 4, cfg)
    assert len(microbatches) == 4 // micro_batch_size
    result = select_engine(cfg, model, bf16=False).forward_backward(microbatches)
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return result.loss, grads, result.tokens


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_accumulated_micro_batches_give_the_full_batch_gradient(model_parallel, micro_batch_size):
    loss_full, grads_full, tokens_full = _grads_after_one_batch(4)
    loss_acc, grads_acc, tokens_acc = _grads_after_one_batch(micro_batch_size)
    assert tokens_acc == tokens_full == 4 * 32
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    assert grads_full.keys() == grads_acc.keys()
    for name in grads_full:
        assert grads_full[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_acc[name], grads_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_step_with_accumulation_updates_weights_like_one_batch(model_parallel):
    # SGD, not Adam: Adam's first step is about lr * sign(grad), which turns rounding noise in
    # near-zero gradient entries into lr-sized weight differences.
    params = []
    for mbs in (4, 1):
        cfg = tiny_config(micro_batch_size=mbs, global_batch_size=4, clip_grad=0.5, optimizer="sgd")
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
        scheduler.step(increment=cfg.global_batch_size)  # past warmup: lr > 0
        metrics = train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, rank_microbatches(TRAIN, 0, cfg))
        assert metrics.grad_norm > 0.5 and metrics.lr > 0  # clipping was active, the step moved weights
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in params[0]:
        torch.testing.assert_close(params[1][name], params[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_segment_forward_is_a_parameter_of_the_step(model_parallel):
    """A replacement segment forward (as a pipeline stage would pass) is what the engine calls."""
    from megaseg.megatron.model import segment_forward

    cfg = tiny_config(micro_batch_size=2, global_batch_size=4)
    model, _, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    microbatches = rank_microbatches(TRAIN, 0, cfg)
    model.zero_grad_buffer()
    want = SequentialEngine(model, cfg, bf16=False).forward_backward(microbatches)
    calls = []

    def traced(m, ids_BL, states):
        calls.append(ids_BL.shape)
        return segment_forward(m, ids_BL, states)

    model.zero_grad_buffer()
    got = SequentialEngine(model, cfg, bf16=False, segment_forward=traced).forward_backward(microbatches)
    assert calls == [(2, cfg.segment_length)] * (2 * cfg.seq_length // cfg.segment_length)
    assert got == want
