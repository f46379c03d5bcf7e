"""--use-distributed-optimizer (megatron-core DistributedOptimizer, ZeRO-1) on two gloo ranks.

Five steps at data-parallel size 2 give the replicated optimizer's losses and weights;
each rank holds about half the Adam state; the TBPTT engine's several backward calls per
micro-batch leave gradient reduction to one reduce-scatter per bucket per step; a
checkpoint saved at DP 2 resumes at DP 1 with the uninterrupted run's next loss and
exports its weights.
"""
import io
from contextlib import redirect_stdout

import pytest
import torch

from megaseg.config import ConfigError
from megaseg.training.setup import optimizer_state_bytes
from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config
from tools import inspect_checkpoint

TRAIN = PatternDataset(64, 32, seed=0)
STEPS = 5
REL = 1e-5


def _settings(**overrides):
    # micro-batch 1: two micro-batches per rank and step, each with 4 segments and K = 1.
    values = dict(train_iters=STEPS, lr_decay_iters=STEPS, micro_batch_size=1, global_batch_size=4, tbptt_k=1)
    values.update(overrides)
    return values


def _train(cfg):
    """STEPS steps of train_step; (losses, weights, optimizer-state bytes, grad syncs per bucket group)."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer

    syncs = []
    original = _ParamAndGradBucketGroup.start_grad_sync

    def counting(self, *args, **kwargs):
        syncs.append(id(self))
        return original(self, *args, **kwargs)

    _ParamAndGradBucketGroup.start_grad_sync = counting
    try:
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
        losses = []
        for it in range(STEPS):
            batches = rank_microbatches(TRAIN, it * cfg.global_batch_size, cfg)
            losses.append(train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, batches).loss)
    finally:
        _ParamAndGradBucketGroup.start_grad_sync = original
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_group = {g: syncs.count(g) for g in set(syncs)}
    return losses, weights, optimizer_state_bytes(optimizer), per_group, len(model.bucket_groups)


def _dp2_rank(rank, port, out_dir):
    from megaseg.megatron import parallel

    torch.set_num_threads(1)
    parallel.initialize_model_parallel(tp=1, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                       timeout_s=120)
    try:
        results = {name: _train(tiny_config(**_settings(use_distributed_optimizer=flag)))
                   for name, flag in (("replicated", False), ("distributed", True))}
        # The first two steps again through pretrain(), saved at iteration 2.
        cfg = tiny_config(out_dir / "run", **_settings(use_distributed_optimizer=True, train_iters=2))
        run = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
        results["pretrain_losses"] = run.losses
        results["checkpoint"] = run.last_checkpoint
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    return spawn_ranks(_dp2_rank, tmp_path_factory, "distopt")


def _close(a, b):
    return rel_close(a, b, REL)


def test_distributed_optimizer_matches_replicated_losses_and_weights(dp2):
    ranks, _ = dp2
    for rank in ranks:
        rep_losses, rep_w, *_ = rank["replicated"]
        dist_losses, dist_w, *_ = rank["distributed"]
        assert all(_close(a, b) for a, b in zip(rep_losses, dist_losses)), (rep_losses, dist_losses)
        assert rep_losses[-1] < rep_losses[0]
        assert sorted(rep_w) == sorted(dist_w)
        for name, want in rep_w.items():
            err = (dist_w[name] - want).abs().max().item()
            assert err <= REL * want.abs().max().item(), (name, err)
    # every data-parallel rank holds the same (all-gathered) weights
    for name, w in ranks[0]["distributed"][1].items():
        assert torch.equal(w, ranks[1]["distributed"][1][name]), name


def test_each_rank_holds_half_the_optimizer_state(dp2):
    ranks, _ = dp2
    replicated = [r["replicated"][2] for r in ranks]
    sharded = [r["distributed"][2] for r in ranks]
    assert replicated[0] == replicated[1] > 0
    # buckets are split at parameter-range boundaries padded for alignment: close to, not exactly, half
    for b in sharded:
        assert 0.45 <= b / replicated[0] <= 0.55, (b, replicated[0])
    assert 0.99 <= sum(sharded) / replicated[0] <= 1.01


def test_gradients_are_reduced_once_per_step_whatever_the_backward_calls(dp2):
    ranks, _ = dp2
    for rank in ranks:
        for name in ("replicated", "distributed"):
            *_, per_group, n_groups = rank[name]
            assert len(per_group) == n_groups >= 1
            assert set(per_group.values()) == {STEPS}, per_group


def test_checkpoint_saved_at_dp2_resumes_at_dp1_with_the_next_step_loss(dp2, model_parallel):
    ranks, out_dir = dp2
    want = ranks[0]["distributed"][0]
    assert all(_close(a, b) for a, b in zip(ranks[0]["pretrain_losses"], want[:2]))
    cfg = tiny_config(out_dir / "run", **_settings(use_distributed_optimizer=True, train_iters=3),
                      load=str(out_dir / "run" / "ckpt"))
    resumed = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
    assert resumed.start_iteration == 2 and len(resumed.losses) == 1
    assert _close(resumed.losses[0], want[2]), (resumed.losses[0], want[2])


def test_distributed_optimizer_checkpoint_exports(dp2, tmp_path):
    from megaseg.checkpoint.training import read_training_weights
    from tests.hf.tiny_hf import load_tool

    ranks, _ = dp2
    sd, cfg, common = read_training_weights(ranks[0]["checkpoint"])
    assert common["layout"]["data_parallel_size"] == 2 and common["args"]["use_distributed_optimizer"]
    assert len(sd) > 0 and all(torch.isfinite(t).all() for t in sd.values())
    convert = load_tool("convert_hf")
    assert convert.main(["export", ranks[0]["checkpoint"], str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    out = io.StringIO()
    with redirect_stdout(out):
        assert inspect_checkpoint.main([ranks[0]["checkpoint"]]) == 0
    report = out.getvalue().splitlines()
    assert "layout: TP 1, PP 1, CP 1, DP 2" in report and "iteration 2, 8 samples consumed, with optimizer state" in report


def test_distributed_optimizer_with_sgd_is_refused_in_one_line():
    from megaseg.training.setup import check_optimizer_settings

    with pytest.raises(ConfigError) as info:
        check_optimizer_settings(tiny_config(use_distributed_optimizer=True, optimizer="sgd"))
    message = str(info.value)
    assert "optimizer='sgd'" in message and "use_distributed_optimizer" in message and "\n" not in message


def test_deepspeed_missing_is_one_line_saying_how_to_install(monkeypatch, tmp_path):
    import builtins

    from megaseg.training.setup import check_optimizer_settings

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(ConfigError) as info:
        check_optimizer_settings(tiny_config(deepspeed=True, deepspeed_config=str(tmp_path / "ds.json")))
    message = str(info.value)
    assert "pip install 'megaseg[deepspeed]'" in message and "\n" not in message
