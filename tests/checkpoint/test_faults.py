"""Preemption and faults: SIGTERM saves and exits 0, kill -9 loses at most one save interval,
non-finite steps are skipped, and a resumed run keeps the checkpoint's LR schedule."""
import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaseg.checkpoint import training as checkpointing
from tests.checkpoint.conftest import TINY_FLAGS
from megaseg.training import engines
from megaseg.training.trainer import INTERRUPTED_FILE, pretrain
from tests.training.synthetic import PatternDataset, tiny_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pretrain" / "pretrain_gpt.py"
FLAGS = TINY_FLAGS + ["--train-iters", "8", "--lr-decay-iters", "8", "--save", "ckpt", "--load", "ckpt"]


def _losses(stdout):
    return {int(line.split()[1].split("/")[0]): line.split("| loss ")[1].split()[0]
            for line in stdout.splitlines() if line.startswith("iteration ")}


def _start(flags, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_9(proc):
    """SIGKILL the run and every process it started (as a scheduler ending a job does)."""
    os.killpg(proc.pid, signal.SIGKILL)


def _run(flags, cwd):
    proc = _start(flags, cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def _until(proc, needle):
    """Read the child's stdout until a line contains ``needle``; returns what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)}\n{proc.stderr.read()}")


@pytest.fixture(scope="module")
def straight(small_data, tmp_path_factory):
    prefix, tokenizer = small_data
    cwd = tmp_path_factory.mktemp("straight")
    return _losses(_run(FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--save-interval", "2"], cwd))


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resume_matches(small_data, straight, tmp_path):
    prefix, tokenizer = small_data
    flags = FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--save-interval", "100"]
    proc = _start(flags, tmp_path)
    first = _until(proc, "iteration 2/8")
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    stopped_at = max(_losses(first + rest))
    assert stopped_at < 8 and f"stopping: signal SIGTERM at iteration {stopped_at}" in rest
    assert (tmp_path / "ckpt" / checkpointing.TRACKER).read_text().strip() == str(stopped_at)
    assert "SIGTERM" in (tmp_path / "ckpt" / INTERRUPTED_FILE).read_text()

    resumed = _losses(_run(flags, tmp_path))
    assert min(resumed) == stopped_at + 1
    assert {i: straight[i] for i in resumed} == resumed  # the printed losses, digit for digit
    assert not (tmp_path / "ckpt" / INTERRUPTED_FILE).exists()  # the run completed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_mid_run_loses_at_most_one_save_interval(small_data, straight, tmp_path, mode):
    prefix, tokenizer = small_data
    flags = FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--save-interval", "2"]
    flags += ["--async-save"] if mode == "async" else []
    proc = _start(flags, tmp_path)
    _until(proc, "iteration 5/8")
    _kill_9(proc)
    proc.communicate(timeout=60)
    resumed = _losses(_run(flags, tmp_path))
    # the save at 4 (or a later one) survived; async: the save in flight may be lost too (2 survived)
    assert min(resumed) >= (5 - 2 + 1 if mode == "sync" else 5 - 4 + 1)
    assert {i: straight[i] for i in resumed} == resumed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(small_data, straight, tmp_path, mode):
    """Async: the kill lands while the background writer runs (before the save is committed)."""
    prefix, tokenizer = small_data
    flags = FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--save-interval", "2", "--keep-last-n", "1"]
    flags += ["--async-save"] if mode == "async" else []
    proc = _start(flags, tmp_path)
    root = tmp_path / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # The second save (iteration 4) is in progress once its temporary directory exists.
        if (root / ".iter_0000004.tmp").exists():
            _kill_9(proc)
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before its second save could be interrupted"
    assert (root / checkpointing.TRACKER).read_text().strip() == "2"
    checkpointing.verify_checkpoint(str(root / "iter_0000002"))  # keep-last-n kept it, whole
    resumed = _losses(_run(flags, tmp_path))
    assert min(resumed) == 3
    assert {i: straight[i] for i in resumed} == resumed
    assert not (root / ".iter_0000004.tmp").exists()


def test_async_save_writes_the_same_checkpoints_and_the_same_losses(small_data, straight, tmp_path):
    prefix, tokenizer = small_data
    flags = FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--save-interval", "2", "--async-save",
                     "--keep-last-n", "2"]
    out = _run(flags, tmp_path)
    assert _losses(out) == straight
    assert "in the background" in out and out.count("saved checkpoint") == 4
    root = tmp_path / "ckpt"
    assert (root / checkpointing.TRACKER).read_text().strip() == "8"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("iter_")) == ["iter_0000006", "iter_0000008"]
    for name in ("iter_0000006", "iter_0000008"):
        checkpointing.verify_checkpoint(str(root / name))
    resumed = _losses(_run(FLAGS + ["--data-path", prefix, "--tokenizer-model", tokenizer, "--train-iters", "8",
                                    "--load", str(root / "iter_0000006"), "--save", "again"], tmp_path))
    assert resumed == {i: straight[i] for i in (7, 8)}


# ---- in-process ------------------------------------------------------------------------------
TRAIN = PatternDataset(64, 32, seed=0)


def _poison(monkeypatch, steps):
    """Make the gradients of the given (1-based) steps NaN, as an overflow would."""
    real = engines.SequentialEngine.forward_backward
    calls = {"n": 0}

    def forward_backward(engine, *args, **kwargs):
        out = real(engine, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in steps:
            for p in engine.model.parameters():
                p.main_grad.fill_(math.nan)
        return out

    monkeypatch.setattr(engines.SequentialEngine, "forward_backward", forward_backward)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_a_non_finite_step_is_skipped_counted_and_training_continues(model_parallel, monkeypatch,
                                                                     distributed_optimizer):
    cfg = tiny_config(train_iters=4, lr_decay_iters=4, use_distributed_optimizer=distributed_optimizer)
    clean = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
    _poison(monkeypatch, {2})
    log = io.StringIO()
    result = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=log)
    assert result.iteration == 4 and result.skipped_steps == 1
    assert "iteration 2: non-finite loss" in log.getvalue() and "step skipped" in log.getvalue()
    assert result.losses[:2] == clean.losses[:2]  # the poisoned step's forward was clean
    # Step 3 sees the weights of step 1 (step 2 changed nothing) on batch 3: not the clean run's loss.
    assert result.losses[2] != clean.losses[2] and all(math.isfinite(x) for x in result.losses)


def test_too_many_non_finite_steps_in_a_row_stop_with_a_message(model_parallel, monkeypatch, tmp_path):
    _poison(monkeypatch, {3, 4, 5})
    cfg = tiny_config(tmp_path, train_iters=6, save_interval=2, max_consecutive_skipped_steps=2)
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient") as info:
        pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
    assert "the last good checkpoint is" in str(info.value) and "(iteration 4)" in str(info.value)
    assert (tmp_path / "ckpt" / checkpointing.TRACKER).read_text().strip() == "4"  # saved weights are step 2's


def _lrs(log):
    return [float(line.split("| lr ")[1].split()[0]) for line in log.splitlines() if line.startswith("iteration")]


def test_extending_train_iters_keeps_the_checkpoint_schedule_unless_overridden(model_parallel, tmp_path):
    first = io.StringIO()
    cfg = tiny_config(tmp_path, train_iters=4)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=first)
    kept, overridden = io.StringIO(), io.StringIO()
    cfg = tiny_config(tmp_path, train_iters=6, load=str(tmp_path / "ckpt"), save=None)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=kept)
    assert "learning-rate schedule continues from the checkpoint; this run's train_iters 4 -> 6" in kept.getvalue()
    assert _lrs(kept.getvalue()) == pytest.approx([1e-3, 1e-3])  # decay already finished at 4: min_lr, no jump
    cfg = tiny_config(tmp_path, train_iters=6, load=str(tmp_path / "ckpt"), save=None,
                      override_opt_param_scheduler=True)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=overridden)
    assert _lrs(overridden.getvalue())[0] > 1e-3  # the stretched cosine of a 6-step run


def test_exit_interval_saves_and_stops(model_parallel, tmp_path):
    cfg = tiny_config(tmp_path, train_iters=6, exit_interval=3)
    result = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, out=io.StringIO())
    assert result.iteration == 3 and result.exit_reason == "exit_interval=3 at iteration 3"
    assert (tmp_path / "ckpt" / checkpointing.TRACKER).read_text().strip() == "3"
    assert not (tmp_path / "ckpt" / INTERRUPTED_FILE).exists()  # a planned stop, not a preemption
