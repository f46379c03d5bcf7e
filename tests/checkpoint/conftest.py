import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaseg.megatron import parallel


@pytest.fixture(scope="module")
def model_parallel():
    """megatron-core parallel state for one gloo process (world size 1)."""
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    yield
    parallel.destroy_model_parallel()


REPO = Path(__file__).resolve().parents[2]
TINY_FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--ffn-hidden-size", "64", "--seq-length", "64", "--segment-length", "16", "--tail-length", "4",
    "--retrieval-length", "4", "--long-range-layers", "1", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-2", "--min-lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--split", "90,10,0",
    "--tensorboard-dir", "none",
]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def torchrun(*args, cwd, nproc=2):
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(REPO / "pretrain" / "pretrain_gpt.py"), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tp2_checkpoint(small_data, tmp_path_factory):
    """The save directory of a 2-step pretraining run at tensor-parallel size 2."""
    prefix, tokenizer = small_data
    cwd = tmp_path_factory.mktemp("tp2")
    run = torchrun(*TINY_FLAGS, "--data-path", prefix, "--tokenizer-model", tokenizer, "--train-iters", "2",
                   "--tensor-model-parallel-size", "2", "--save", "ckpt", cwd=cwd)
    assert run.returncode == 0, run.stderr
    return cwd / "ckpt"
