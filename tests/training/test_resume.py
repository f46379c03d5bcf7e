"""Checkpoints: resume reproduces the uninterrupted run exactly; saves are atomic."""
import io
import os

import pytest
import torch
from megatron.core import dist_checkpointing

from megaseg.checkpoint import training as checkpointing
from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, tiny_config

TRAIN = PatternDataset(64, 32, seed=0)
VALID = PatternDataset(8, 32, seed=1)


def _run(cfg):
    return pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO())


def _plain(directory):
    """Every tensor of a checkpoint, flattened to dotted keys."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}{i}.", v)
        elif isinstance(value, torch.Tensor):
            out[prefix[:-1]] = value

    walk("", dist_checkpointing.load_plain_tensors(directory))
    return out


def test_resume_reproduces_uninterrupted_losses_exactly(model_parallel, tmp_path):
    straight = _run(tiny_config(tmp_path / "a", train_iters=4, lr_decay_iters=4))
    first = _run(tiny_config(tmp_path / "b", train_iters=2, lr_decay_iters=4))
    resumed = _run(tiny_config(tmp_path / "b", train_iters=4, lr_decay_iters=4, load=str(tmp_path / "b" / "ckpt")))

    assert resumed.start_iteration == 2
    assert first.losses == straight.losses[:2]
    assert resumed.losses == straight.losses[2:]  # bit-exact, not approximately
    assert len(set(straight.losses)) == len(straight.losses)  # every step changed the weights
    # Weights and optimizer moments at iteration 4 are identical too.
    a, b = _plain(straight.last_checkpoint), _plain(resumed.last_checkpoint)
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tracker_names_the_latest_complete_checkpoint(model_parallel, tmp_path):
    result = _run(tiny_config(tmp_path, train_iters=3, save_interval=2))
    root = tmp_path / "ckpt"
    assert (root / checkpointing.TRACKER).read_text().strip() == "3"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", checkpointing.TRACKER]
    assert result.last_checkpoint == str(root / "iter_0000003")
    for name in ("metadata.json", "common.pt", checkpointing.MANIFEST):
        assert (root / "iter_0000003" / name).is_file()


class _Crash(Exception):
    pass


def test_crash_mid_save_leaves_previous_checkpoint_loadable(model_parallel, tmp_path, monkeypatch):
    straight = _run(tiny_config(tmp_path / "a", train_iters=4, lr_decay_iters=4))
    root = tmp_path / "b" / "ckpt"
    _run(tiny_config(tmp_path / "b", train_iters=2, lr_decay_iters=4))

    def crash(directory):  # the shard files of iteration 3 are written, the checkpoint is not committed
        (root / ".iter_0000003.tmp" / "common.pt").write_bytes(b"partial")
        raise _Crash()

    with monkeypatch.context() as m:
        m.setattr(checkpointing, "_write_manifest", crash)
        with pytest.raises(_Crash):
            _run(tiny_config(tmp_path / "b", train_iters=4, lr_decay_iters=4, save_interval=1, load=str(root)))
    assert (root / checkpointing.TRACKER).read_text().strip() == "2"
    assert (root / ".iter_0000003.tmp").is_dir()

    resumed = _run(tiny_config(tmp_path / "b", train_iters=4, lr_decay_iters=4, load=str(root)))
    assert resumed.start_iteration == 2
    assert resumed.losses == straight.losses[2:]
    assert not (root / ".iter_0000003.tmp").exists()  # cleaned up by the next save


def test_resaving_an_iteration_interrupted_before_its_rename_keeps_the_old_copy(model_parallel, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _run(tiny_config(tmp_path, train_iters=2))
    real_rename = os.rename

    def rename_then_crash(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".old"):
            raise _Crash()

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename_then_crash)
        with pytest.raises(_Crash):
            _run(tiny_config(tmp_path, train_iters=2, overwrite_checkpoints=True))  # a fresh run saving into the same directory
    # iter_0000002 was set aside and its replacement never renamed in: the old copy is used.
    assert not (root / "iter_0000002").exists()
    found = checkpointing.find_checkpoint(str(root))
    assert found.endswith(".iter_0000002.old")
    checkpointing.verify_checkpoint(found)
    resumed = _run(tiny_config(tmp_path, train_iters=3, lr_decay_iters=4, load=str(root)))
    assert resumed.start_iteration == 2
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", checkpointing.TRACKER]


def _corrupt_cases(root):
    it = root / "iter_0000002"
    return {
        "truncated shard": (lambda: _truncate(it / "__0_0.distcp"), "__0_0.distcp"),
        "flipped byte": (lambda: _flip(it / "common.pt"), "common.pt"),
        "missing file": (lambda: (it / "metadata.json").unlink(), "metadata.json"),
        "no manifest": (lambda: (it / checkpointing.MANIFEST).unlink(), checkpointing.MANIFEST),
        "bad tracker": (lambda: (root / checkpointing.TRACKER).write_text("two\n"), checkpointing.TRACKER),
        "tracker to nothing": (lambda: (root / checkpointing.TRACKER).write_text("7\n"), "iter_0000007"),
    }


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(_corrupt_cases(__import__("pathlib").Path("x"))))
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(model_parallel, tmp_path, case):
    _run(tiny_config(tmp_path, train_iters=2))
    root = tmp_path / "ckpt"
    damage, name = _corrupt_cases(root)[case]
    damage()
    with pytest.raises(checkpointing.CheckpointError) as info:
        _run(tiny_config(tmp_path, train_iters=3, load=str(root)))
    message = str(info.value)
    assert name in message and "\n" not in message


def test_checkpoint_of_another_model_is_rejected_naming_the_field(model_parallel, tmp_path):
    _run(tiny_config(tmp_path, train_iters=2))
    with pytest.raises(checkpointing.CheckpointError) as info:
        _run(tiny_config(tmp_path, train_iters=3, hidden_size=64, load=str(tmp_path / "ckpt")))
    message = str(info.value)
    assert "common.pt" in message and "hidden_size" in message and "\n" not in message


def test_load_from_a_missing_directory_fails_unless_it_is_the_save_directory(model_parallel, tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
        _run(tiny_config(tmp_path, train_iters=1, lr_warmup_iters=0, load=str(tmp_path / "nope")))
    result = _run(tiny_config(tmp_path, train_iters=1, lr_warmup_iters=0, load=str(tmp_path / "ckpt")))
    assert result.start_iteration == 0 and result.iteration == 1


def _lrs(log):
    return [float(line.split("| lr ")[1].split()[0]) for line in log.getvalue().splitlines()
            if line.startswith("iteration")]


def test_no_load_optim_keeps_weights_position_and_schedule_but_fresh_optimizer(model_parallel, tmp_path):
    straight_log = io.StringIO()
    cfg = tiny_config(train_iters=4, lr_decay_iters=4)
    straight = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=straight_log)
    _run(tiny_config(tmp_path, train_iters=2, lr_decay_iters=4))
    log = io.StringIO()
    cfg = tiny_config(train_iters=4, lr_decay_iters=4, load=str(tmp_path / "ckpt"), no_load_optim=True)
    fresh = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=log)
    assert fresh.start_iteration == 2
    assert _lrs(log) == _lrs(straight_log)[2:] == pytest.approx([7.75e-3, 3.25e-3])  # the schedule continues
    assert fresh.losses[0] == straight.losses[2]  # same weights and batch: the first loss is identical
    assert fresh.losses[1] != straight.losses[3]  # ... but Adam restarted from zero moments


@pytest.mark.parametrize("override", [True, False])
def test_a_resume_trains_at_the_learning_rate_it_announces(model_parallel, tmp_path, override):
    """--override-opt-param-scheduler with a new --lr: the logged (and applied) rate is the new
    one; without the override the checkpoint's schedule continues."""
    _run(tiny_config(tmp_path, train_iters=2, lr_decay_iters=4))
    log = io.StringIO()
    cfg = tiny_config(train_iters=4, lr=5e-4, min_lr=5e-4, lr_decay_style="constant", lr_warmup_iters=0,
                      load=str(tmp_path / "ckpt"), override_opt_param_scheduler=override)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=log)
    if override:
        assert "learning-rate schedule from this run's flags" in log.getvalue()
        assert _lrs(log) == pytest.approx([5e-4, 5e-4])
    else:
        assert "continues from the checkpoint" in log.getvalue()
        assert _lrs(log) == pytest.approx([7.75e-3, 3.25e-3])


def test_a_run_never_takes_over_another_runs_checkpoints(model_parallel, tmp_path):
    """--save holding checkpoints, no --load: the same run resumes; another run is refused
    before any work, and the first run's checkpoints and tracker are untouched."""
    from megaseg.config import ConfigError

    first = _run(tiny_config(tmp_path, train_iters=2, lr_decay_iters=4))
    root = tmp_path / "ckpt"
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(ConfigError) as info:
        _run(tiny_config(tmp_path, train_iters=2, hidden_size=48))
    message = str(info.value)
    assert "\n" not in message and "holds the checkpoints of another run" in message
    assert "hidden_size 32 -> 48" in message and f"--load {root}" in message and "--overwrite-checkpoints" in message
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert (root / checkpointing.TRACKER).read_text().strip() == "2"

    log = io.StringIO()
    cfg = tiny_config(tmp_path, train_iters=4, lr_decay_iters=4)
    resumed = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=log)
    assert "holds this run's checkpoint at iteration 2: resuming from it" in log.getvalue()
    straight = _run(tiny_config(tmp_path / "straight", train_iters=4, lr_decay_iters=4))
    assert resumed.start_iteration == 2 and resumed.losses == straight.losses[2:]
    assert first.losses == straight.losses[:2]


def test_overwrite_checkpoints_starts_over_and_replaces_them_once_it_has_saved(model_parallel, tmp_path):
    _run(tiny_config(tmp_path, train_iters=3, save_interval=2))
    root = tmp_path / "ckpt"
    other = _run(tiny_config(tmp_path, train_iters=2, save_interval=5, hidden_size=48, overwrite_checkpoints=True))
    assert other.start_iteration == 0
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", checkpointing.TRACKER]
    assert (root / checkpointing.TRACKER).read_text().strip() == "2"
    assert checkpointing.read_training_common(str(root))[1]["args"]["hidden_size"] == 48


def test_keep_last_n_keeps_the_newest_and_the_one_resumed_from(model_parallel, tmp_path):
    root = tmp_path / "ckpt"
    _run(tiny_config(tmp_path, train_iters=4, lr_decay_iters=6, save_interval=1, keep_last_n=2))
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", checkpointing.TRACKER]
    resumed = _run(tiny_config(tmp_path, train_iters=6, lr_decay_iters=6, save_interval=1, keep_last_n=1,
                               load=str(root / "iter_0000003")))
    assert resumed.start_iteration == 3
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000006", checkpointing.TRACKER]
    assert (root / checkpointing.TRACKER).read_text().strip() == "6"
