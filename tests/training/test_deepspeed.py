"""--deepspeed with ZeRO stage 1 and 2 on two gloo ranks.

Five steps give the replicated megatron optimizer's losses and weights; each rank holds
half the Adam state; a checkpoint saved at DP 2 resumes at DP 1 with the uninterrupted
run's next loss; a DeepSpeed config that contradicts the flags is a one-line error.
"""
import io
import json
import os

import pytest
import torch

from megaseg.config import ConfigError
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'megaseg[deepspeed]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TRAIN = PatternDataset(64, 32, seed=0)
STEPS = 5
REL = 1e-5


def _settings(**overrides):
    values = dict(train_iters=STEPS, lr_decay_iters=STEPS, micro_batch_size=1, global_batch_size=4, tbptt_k=1)
    values.update(overrides)
    return values


def _write_config(path, stage, zero=None, **extra):
    """Write the DeepSpeed JSON atomically: both spawned ranks write the same file, and a rank
    must never read the other's half-written one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    config = {"zero_optimization": {"stage": stage, **(zero or {})}, "train_batch_size": "auto", **extra}
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)
    return str(path)


def _train(cfg):
    """(losses, weights, optimizer-state bytes, per parameter: how many times each step reduced it)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import optimizer_state_bytes, setup_model_and_optimizer

    reductions = []
    original = DeepSpeedZeroOptimizer.reduce_ready_partitions_and_remove_grads

    def counting(self, param, *args, **kwargs):
        reductions[-1].append(id(param))
        return original(self, param, *args, **kwargs)

    DeepSpeedZeroOptimizer.reduce_ready_partitions_and_remove_grads = counting
    try:
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
        losses = []
        for it in range(STEPS):
            reductions.append([])
            batches = rank_microbatches(TRAIN, it * cfg.global_batch_size, cfg)
            losses.append(train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, batches).loss)
    finally:
        DeepSpeedZeroOptimizer.reduce_ready_partitions_and_remove_grads = original
    weights = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    n_params = len(list(model.parameters()))
    per_step = [sorted({reds.count(p) for p in set(reds)}) + [len(set(reds)) == n_params] for reds in reductions]
    return losses, weights, optimizer_state_bytes(optimizer), per_step


def _cpu_adam_built() -> bool:
    """DeepSpeed's CPU Adam (optimizer offload) is a C++ extension compiled on first use, which
    takes minutes; its test runs where it has been built already."""
    import os

    from torch.utils.cpp_extension import _get_build_directory

    return os.path.exists(os.path.join(_get_build_directory("cpu_adam", False), "cpu_adam.so"))


def _replicated(cfg):
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import optimizer_state_bytes, setup_model_and_optimizer

    model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    engine = select_engine(cfg, model, bf16=False)
    losses = [train_step(engine, optimizer, scheduler, rank_microbatches(TRAIN, it * cfg.global_batch_size, cfg)).loss
              for it in range(STEPS)]
    weights = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, optimizer_state_bytes(optimizer)


def _dp2_rank(rank, port, out_dir):
    from megaseg.megatron import parallel
    from megaseg.training.trainer import pretrain

    torch.set_num_threads(1)
    parallel.initialize_model_parallel(tp=1, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                       timeout_s=120)
    try:
        results = {"replicated": _replicated(tiny_config(**_settings()))}
        for stage in (1, 2):
            ds = _write_config(out_dir / f"ds{stage}.json", stage)
            results[f"zero{stage}"] = _train(tiny_config(**_settings(deepspeed=True, deepspeed_config=ds)))
        if _cpu_adam_built():
            ds = _write_config(out_dir / "ds_offload.json", 2, zero={"offload_optimizer": {"device": "cpu"}})
            results["zero2_offload"] = _train(tiny_config(**_settings(deepspeed=True, deepspeed_config=ds)))
        cfg = tiny_config(out_dir / "run", **_settings(deepspeed=True, deepspeed_config=str(out_dir / "ds2.json"),
                                                       train_iters=2))
        run = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
        results["pretrain_losses"] = run.losses
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    return spawn_ranks(_dp2_rank, tmp_path_factory, "deepspeed")


def _close(a, b):
    return rel_close(a, b, REL)


@pytest.mark.parametrize("stage", ["1", "2", "2_offload"])
def test_zero_matches_the_replicated_optimizer_with_half_the_state(dp2, stage):
    ranks, _ = dp2
    if f"zero{stage}" not in ranks[0]:
        pytest.skip("DeepSpeed's CPU Adam extension is not built (python -c 'from deepspeed.ops.adam import "
                    "DeepSpeedCPUAdam; DeepSpeedCPUAdam([])' builds it, in minutes)")
    for rank in ranks:
        rep_losses, rep_w, rep_bytes = rank["replicated"]
        losses, weights, nbytes, reductions = rank[f"zero{stage}"]
        # every parameter reduced exactly once per step, though each micro-batch ran 4 + 3 backward calls
        assert reductions == [[1, True]] * STEPS, reductions
        assert all(_close(a, b) for a, b in zip(rep_losses, losses)), (rep_losses, losses)
        assert sorted(weights) == sorted(rep_w)
        for name, want in rep_w.items():
            err = (weights[name] - want).abs().max().item()
            assert err <= REL * want.abs().max().item(), (name, err)
        assert 0.45 <= nbytes / rep_bytes <= 0.55, (nbytes, rep_bytes)


def test_deepspeed_checkpoint_saved_at_dp2_resumes_at_dp1(dp2, model_parallel, monkeypatch):
    from megaseg.training.trainer import pretrain

    # DeepSpeed's setup sets LOCAL_RANK when it is missing; left behind, it makes later
    # in-process users of accelerate (lm_eval's hf backend) start a process group.
    monkeypatch.setenv("LOCAL_RANK", "0")

    ranks, out_dir = dp2
    want = ranks[0]["zero2"][0]
    assert all(_close(a, b) for a, b in zip(ranks[0]["pretrain_losses"], want[:2]))
    cfg = tiny_config(out_dir / "run", **_settings(deepspeed=True, deepspeed_config=str(out_dir / "ds2.json"),
                                                   train_iters=3), load=str(out_dir / "run" / "ckpt"))
    resumed = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
    assert resumed.start_iteration == 2 and len(resumed.losses) == 1
    assert _close(resumed.losses[0], want[2]), (resumed.losses[0], want[2])
    from megaseg.checkpoint.training import read_training_weights

    sd, _, common = read_training_weights(str(out_dir / "run" / "ckpt" / "iter_0000002"))
    assert common["layout"]["data_parallel_size"] == 2 and len(sd) > 0


@pytest.mark.parametrize("extra, needles", [
    ({"train_micro_batch_size_per_gpu": 4}, ["train_micro_batch_size_per_gpu=4", "micro_batch_size=2"]),
    ({"train_batch_size": 8}, ["train_batch_size=8", "global_batch_size=4"]),
    ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "clip_grad=1.0"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "bf16=False"]),
])
def test_a_config_contradicting_the_flags_is_one_line_naming_both(tmp_path, model_parallel, extra, needles):
    from megaseg.training.setup import check_optimizer_settings

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **extra}))
    with pytest.raises(ConfigError) as info:
        check_optimizer_settings(tiny_config(deepspeed=True, deepspeed_config=str(path)))
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
