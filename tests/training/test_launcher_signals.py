"""Preemption of a multi-rank job through the launcher: SIGTERM to examples/pretrain_torchrun.sh
(CP 2 and PP 2 over two gloo ranks, CP 2 x DP 2 over four) makes every rank save at the same step,
the launcher exits 0 with one line, and the same command resumes and reproduces the uninterrupted
run's losses."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.checkpoint.conftest import TINY_FLAGS, subprocess_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain_torchrun.sh"
ITERS = 30


def _losses(text):
    return [float(line.split("| loss ")[1].split()[0]) for line in text.splitlines() if line.startswith("iteration ")]


LAYOUTS = {"cp2": ["--context-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"],
           "cp2xdp2": ["--context-parallel-size", "2"]}
NPROC = {"cp2xdp2": "4"}  # the others: 2


def _command(prefix, tokenizer, save, layout="cp2"):
    return ["bash", str(SCRIPT), *TINY_FLAGS, "--data-path", prefix, "--tokenizer-model", tokenizer, *LAYOUTS[layout],
            "--train-iters", str(ITERS), "--save", str(save), "--save-interval", "100"]


ENV = {**subprocess_env(), "NPROC": "2", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def straight(small_data, tmp_path_factory):
    """The uninterrupted run's losses (CP 2)."""
    return _straight(small_data, tmp_path_factory, "cp2")


def _straight(small_data, tmp_path_factory, layout):
    prefix, tokenizer = small_data
    cwd = tmp_path_factory.mktemp("straight")
    run = subprocess.run(_command(prefix, tokenizer, cwd / "ckpt", layout), cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = _losses(run.stdout)
    assert len(losses) == ITERS
    return losses


def _wait_for_iterations(log: Path, n: int, proc) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_losses(log.read_text())) < n:
        time.sleep(0.2)


def _ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the ranks torchrun (the launcher's child) started."""
    out = {}
    for torchrun in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        for pid in subprocess.run(["pgrep", "-P", torchrun], capture_output=True, text=True).stdout.split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK="))
            out[rank] = int(pid)
    return out


def _resume_matches(prefix, tokenizer, save, tmp_path, first, want, layout="cp2"):
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    again = subprocess.run(_command(prefix, tokenizer, save, layout), cwd=tmp_path,
                           env={**ENV, "NPROC": NPROC.get(layout, "2")}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"holds this run's checkpoint at iteration {stopped}: resuming" in again.stdout
    got = first[:stopped] + _losses(again.stdout)
    assert len(got) == ITERS and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)
    return stopped


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigterm_to_the_launcher_saves_on_every_rank_and_exits_0(small_data, tmp_path, tmp_path_factory, straight,
                                                                 layout):
    prefix, tokenizer = small_data
    env = {**ENV, "NPROC": NPROC.get(layout, "2")}
    # CP 2 x DP 2 splits each global batch over two data-parallel ranks: the CP 2 run's losses
    want = straight if layout.startswith("cp2") else _straight(small_data, tmp_path_factory, layout)

    save = tmp_path / "run"
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(_command(prefix, tokenizer, save, layout), cwd=tmp_path, env=env, stdout=log,
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
    _resume_matches(prefix, tokenizer, save, tmp_path, first, want, layout)


def _wait_for_save(save: Path, iteration: int, proc) -> None:
    """Until the save of ``iteration`` is being written (its temporary directory exists)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (save / f".iter_{iteration:07d}.tmp").exists():
        time.sleep(0.002)


@pytest.mark.parametrize("when", ["step", "save"])
def test_kill_9_of_one_rank_fails_the_job_promptly_and_the_last_checkpoint_resumes(small_data, tmp_path, straight,
                                                                                    when):
    """kill -9 of rank 1 mid-step or mid-save: the launcher exits non-zero within a bounded
    time, torchrun's report names rank 1, the last complete checkpoint verifies, and the
    resume matches."""
    from megaseg.checkpoint.training import find_checkpoint, verify_checkpoint

    prefix, tokenizer = small_data
    save = tmp_path / "run"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(prefix, tokenizer, save) + ["--save-interval", "2"], cwd=tmp_path, env=ENV,
                                stdout=out, stderr=subprocess.PIPE, text=True)
        if when == "step":
            _wait_for_iterations(log, 5, proc)
        else:
            _wait_for_save(save, 4, proc)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        killed = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    took = time.time() - killed
    assert proc.returncode != 0 and took < 120, (proc.returncode, took)
    assert "rank      : 1" in err and "exitcode  : -9" in err, err[-3000:]
    assert "pretrain_torchrun.sh: the run failed" in err
    verify_checkpoint(find_checkpoint(str(save)))
    stopped = _resume_matches(prefix, tokenizer, save, tmp_path, _losses(log.read_text()), straight)
    assert stopped % 2 == 0 and stopped >= (4 if when == "step" else 2)


def _hung_peer_rank(rank, port, out_dir):
    """CP 2 with a 4-second distributed timeout: rank 1 never sends its tail; rank 0's
    receive in the context-parallel group must fail instead of waiting forever."""
    from megatron.core import parallel_state as ps

    from megaseg.megatron import parallel

    parallel.initialize_model_parallel(cp=2, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                       timeout_s=4)
    outcome = "no error"
    try:
        if rank == 0:
            import torch
            import torch.distributed as dist

            start = time.time()
            buf = torch.empty(4)
            try:
                dist.irecv(buf, 1, group=ps.get_context_parallel_group(), tag=7).wait()
            except RuntimeError as exc:
                outcome = f"{time.time() - start:.1f} s: {str(exc).splitlines()[0][:80]}"
        else:
            time.sleep(12)  # hung: never sends
    finally:
        (out_dir / f"rank{rank}.txt").write_text(outcome)
        parallel.destroy_model_parallel()


def test_a_hung_peer_fails_the_exchange_after_the_distributed_timeout(tmp_path):
    import torch.multiprocessing as mp

    from megaseg.megatron.parallel import free_port

    mp.spawn(_hung_peer_rank, args=(free_port(), tmp_path), nprocs=2, join=True)
    outcome = (tmp_path / "rank0.txt").read_text()
    assert outcome != "no error", outcome
    assert float(outcome.split(" s:")[0]) < 10, outcome


def test_slurm_script_usr1_saves_on_every_rank_requeues_and_the_requeued_job_matches(small_data, tmp_path, straight):
    """examples/pretrain_slurm.sbatch with stand-ins for srun and scontrol (one node, CP 2):
    Slurm's USR1 to the batch script reaches every rank as SIGUSR1 through srun and the
    launcher; the ranks save at one step, the job asks for a requeue and exits 0; running it
    again (the requeued job) finishes with the uninterrupted losses."""
    from megaseg.megatron.parallel import free_port

    prefix, tokenizer = small_data
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake / "scontrol").write_text('#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; '
                                   'else echo "scontrol $*" >> "$SCONTROL_LOG"; fi\n')
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    save = tmp_path / "ckpt"
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "2",
           "CONFIG": "examples/default.yaml", "SAVE": str(save), "MASTER_PORT": str(free_port()),
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "OMP_NUM_THREADS": "1"}
    command = ["bash", str(REPO / "examples" / "pretrain_slurm.sbatch"), *TINY_FLAGS, "--data-path", prefix,
               "--tokenizer-model", tokenizer, "--context-parallel-size", "2", "--train-iters", str(ITERS),
               "--save-interval", "100"]
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _wait_for_iterations(log, 2, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "time limit near: asking the run to save and stop" in text and "requeueing" in text
    assert "SignalException" not in text and "Traceback" not in text
    assert (tmp_path / "scontrol.log").read_text().split() == ["scontrol", "requeue", "42"]
    first = _losses(text)
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped == len(first) < ITERS

    env["MASTER_PORT"] = str(free_port())
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "requeueing" not in again.stdout
    got = first + _losses(again.stdout)
    assert len(got) == ITERS and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, straight)), (got, straight)
