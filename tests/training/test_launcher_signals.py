"""Preemption of a multi-rank job through the launcher: SIGTERM to examples/pretrain_torchrun.sh
(CP 2 over two gloo ranks) makes every rank save at the same step, the launcher exits 0 with
one line, and the same command resumes and reproduces the uninterrupted run's losses."""
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.checkpoint.conftest import TINY_FLAGS, subprocess_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain_torchrun.sh"
ITERS = 30


def _losses(text):
    return [float(line.split("| loss ")[1].split()[0]) for line in text.splitlines() if line.startswith("iteration ")]


def _command(prefix, tokenizer, save):
    return ["bash", str(SCRIPT), *TINY_FLAGS, "--data-path", prefix, "--tokenizer-model", tokenizer,
            "--context-parallel-size", "2", "--train-iters", str(ITERS), "--save", str(save), "--save-interval", "100"]


def test_sigterm_to_the_launcher_saves_on_every_rank_and_exits_0(small_data, tmp_path):
    prefix, tokenizer = small_data
    env = {**subprocess_env(), "NPROC": "2", "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run(_command(prefix, tokenizer, tmp_path / "straight"), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    want = _losses(straight.stdout)
    assert len(want) == ITERS

    save = tmp_path / "run"
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(_command(prefix, tokenizer, save), cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_losses(Path(tmp_path / "run.log").read_text())) < 2:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("pretrain_torchrun.sh")]
    assert lines == ["pretrain_torchrun.sh: SIGTERM: every rank saved a checkpoint at the same step; resume with the "
                     "same command"]
    assert "Traceback" not in err and "SignalException" not in err
    first = _losses(Path(tmp_path / "run.log").read_text())
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped == len(first) < ITERS
    assert [p.name for p in save.iterdir() if p.name.startswith("iter_")] == [f"iter_{stopped:07d}"]

    again = subprocess.run(_command(prefix, tokenizer, save), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"holds this run's checkpoint at iteration {stopped}: resuming" in again.stdout
    got = first + _losses(again.stdout)
    assert len(got) == ITERS and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)
