"""Pretraining with context parallelism: CP2 trains, validates and checkpoints like CP1, and
checkpoints move between CP2 and CP1 with the same losses."""
import io

import pytest
import torch

from megaseg.config import ConfigError
from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config

TRAIN = PatternDataset(64, 32, seed=0)
VALID = PatternDataset(8, 32, seed=1)
ITERS = dict(train_iters=4, lr_decay_iters=4, eval_interval=2, save_interval=2)


def _run(cfg):
    return pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO())


def _cp2_rank(rank, port, out_dir, cp1_save):
    from megaseg.megatron import parallel

    parallel.initialize_model_parallel(cp=2, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                       timeout_s=120)
    try:
        straight = _run(tiny_config(out_dir / "cp2", context_parallel_size=2, **ITERS))
        resumed = _run(tiny_config(out_dir / "cp2_from_cp1", context_parallel_size=2, **ITERS,
                                   load=f"{cp1_save}/iter_0000002"))
    finally:
        parallel.destroy_model_parallel()
    torch.save({"straight": straight, "resumed": resumed}, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(model_parallel, tmp_path_factory):
    cp1_dir = tmp_path_factory.mktemp("cp1")
    cp1 = _run(tiny_config(cp1_dir, **ITERS))
    ranks, out_dir = spawn_ranks(_cp2_rank_with(cp1_dir / "ckpt"), tmp_path_factory, "cp2")
    cp1_from_cp2 = _run(tiny_config(tmp_path_factory.mktemp("cp1b"), **ITERS,
                                    load=str(out_dir / "cp2" / "ckpt" / "iter_0000002")))
    return cp1, ranks[0], cp1_from_cp2


def _cp2_rank_with(cp1_save):
    import functools

    return functools.partial(_cp2_entry, cp1_save=str(cp1_save))


def _cp2_entry(rank, port, out_dir, cp1_save):
    _cp2_rank(rank, port, out_dir, cp1_save)


def _all_close(a, b):
    return len(a) == len(b) and all(rel_close(x, y) for x, y in zip(a, b))


def test_cp2_training_equals_cp1(runs):
    cp1, cp2, _ = runs
    assert _all_close(cp2["straight"].losses, cp1.losses), (cp2["straight"].losses, cp1.losses)
    assert [it for it, _ in cp2["straight"].valid_losses] == [2, 4]
    assert _all_close([v for _, v in cp2["straight"].valid_losses], [v for _, v in cp1.valid_losses])
    assert len(set(cp1.losses)) == len(cp1.losses)  # every step changed the weights


def test_checkpoints_move_between_cp2_and_cp1(runs):
    cp1, cp2, cp1_from_cp2 = runs
    assert cp2["resumed"].start_iteration == 2 and cp1_from_cp2.start_iteration == 2
    assert _all_close(cp2["resumed"].losses, cp1.losses[2:]), (cp2["resumed"].losses, cp1.losses)
    assert _all_close(cp1_from_cp2.losses, cp1.losses[2:]), (cp1_from_cp2.losses, cp1.losses)


def test_untruncated_gradient_on_one_rank_is_the_one_pass_gradient(model_parallel):
    """tbptt_k = -1 trains with the one-pass backward; it differs from K = 1 after one step."""
    untruncated = _run(tiny_config(None, tbptt_k=-1, train_iters=2, eval_iters=0))
    k1 = _run(tiny_config(None, tbptt_k=1, train_iters=2, eval_iters=0))
    assert untruncated.losses[0] == pytest.approx(k1.losses[0], rel=1e-6)  # same weights, same forward
    assert untruncated.losses[1] != k1.losses[1]


@pytest.mark.parametrize("overrides,message", [
    (dict(context_parallel_size=5), "context_parallel_size=5 is invalid: a sequence of seq_length=32 has 4 segment"),
    (dict(context_parallel_size=2, pipeline_model_parallel_size=2), "context_parallel_size=2 is invalid"),
    (dict(tbptt_k=-2), "tbptt_k=-2 is invalid"),
])
def test_bad_context_parallel_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(None, **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
