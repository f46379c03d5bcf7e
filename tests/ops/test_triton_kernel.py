"""The fused Triton kernel against the SDPA kernel, and kernel selection.

The kernel runs under Triton's interpreter on CPU tensors. The interpreter has to be
switched on before triton is imported, for the whole process, so the comparisons run in
one child process (`tests/ops/triton_cases.py`) and this process never sets the variable:
nothing leaks into other tests and the result does not depend on test order.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
from megaseg.ops import kernels
from megaseg.ops.kernels import SegmentBatch
from megaseg.ops.segmented_attention import SegmentedAttention
from tests.ops.triton_cases import CASES

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")

FP32_FWD = 1e-5  # max abs error of the output (values are O(1))
FP32_GRAD = 1e-4  # max abs error / max abs gradient, per input
BF16_FWD = 4e-2  # against the fp32 result: a few bf16 ulps (2^-8) of O(1) values
BF16_GRAD = 3e-2


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ops.triton_cases"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@needs_triton
@pytest.mark.parametrize("case", [c for c, (_, _, dt) in CASES.items() if dt == "float32"])
def test_triton_matches_sdpa_fp32(interpreted, case):
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    assert res["fwd"] <= FP32_FWD, res
    assert max(res["grad"]) <= FP32_GRAD, res


@needs_triton
@pytest.mark.parametrize("case", [c for c, (_, _, dt) in CASES.items() if dt == "bfloat16"])
def test_triton_bf16_within_bf16_tolerance(interpreted, case):
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    # Both kernels are judged against fp32; the fused kernel rounds P to bf16 before P.V
    # as FlashAttention does, so it may be a little further off than SDPA, not more.
    assert res["fwd"] <= BF16_FWD and res["fwd"] <= 4 * res["fwd_sdpa_bf16"], res
    assert max(res["grad"]) <= BF16_GRAD, res
    assert all(t <= 4 * s + 1e-3 for t, s in zip(res["grad"], res["grad_sdpa_bf16"])), res


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not run Triton's compiler; this compiles every kernel of the
    CUDA path (rope, forward, dQ, dK/dV prefix and segment) for sm_90 with the launch
    configuration `attend` uses, in bf16 at head dim 128 (Llama-2 7B's), and checks that each
    fits the shared memory of an A100 (the smallest target here; H100/H200 have more)."""
    code = (
        "import json, torch\n"
        "from megaseg.ops.kernels import triton_segmented as t\n"
        "print(json.dumps({d: t.compile_for(90, torch.bfloat16, d, 4) for d in (128,)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout)
    for d, kernels_ in compiled.items():
        assert set(kernels_) == {"rope", "rope_inverse", "forward", "backward_dq",
                                 "backward_dkdv_prefix", "backward_dkdv_segment"}
        for name, meta in kernels_.items():
            assert meta["cubin_bytes"] > 0, (d, name)
            assert meta["shared_bytes"] <= 163 * 1024, (d, name, meta)


# ---------------------------------------------------------------------------------------
# Selection
def test_auto_selects_triton_only_on_cuda_with_triton(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.choose("auto", "cuda", torch.bfloat16, 128) == "triton"
    assert kernels.choose("auto", "cpu", torch.bfloat16, 128) == "sdpa"
    assert kernels.choose("auto", "cuda", torch.float64, 128) == "sdpa"
    assert kernels.choose("auto", "cuda", torch.float16, 512) == "sdpa"
    assert kernels.choose("sdpa", "cuda", torch.bfloat16, 128) == "sdpa"
    assert kernels.choose("triton", "cpu", torch.float32, 64) == "triton"
    with pytest.raises(ValueError, match="sdpa"):
        kernels.choose("triton", "cuda", torch.float64, 64)
    with pytest.raises(ValueError, match="allowed auto, sdpa, triton"):
        kernels.choose("flash", "cuda", torch.float32, 64)


def test_missing_triton_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    assert not kernels.triton_available()
    assert kernels.choose("auto", "cuda", torch.bfloat16, 128) == "sdpa"
    with pytest.raises(ImportError, match="pip install triton"):
        kernels.choose("triton", "cuda", torch.bfloat16, 128)
    # The operator runs (auto -> sdpa) and gives the sdpa result.
    seg = SegmentConfig(4, 2, 3, 1, "sum")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 11, 6, 8, generator=g), torch.randn(1, 11, 3, 8, generator=g), torch.randn(1, 11, 3, 8, generator=g)
    modes = (LOCAL, RETRIEVAL, SEGMENT)
    auto, _ = SegmentedAttention(modes, seg, RopeConfig(), 8, 2, kernel="auto")(q, k, v)
    ref, _ = SegmentedAttention(modes, seg, RopeConfig(), 8, 2, kernel="sdpa")(q, k, v)
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)


def test_process_default_and_validation(monkeypatch):
    monkeypatch.setattr(kernels, "_default", "auto")
    kernels.set_default("sdpa")
    assert kernels.get_default() == "sdpa"
    with pytest.raises(ValueError, match="allowed"):
        kernels.set_default("cudnn")
    assert kernels.get_default() == "sdpa"
    with pytest.raises(ValueError, match="allowed"):
        SegmentedAttention((LOCAL,), SegmentConfig(4, 2, 0, 1, "sum"), RopeConfig(), 8, 1, kernel="fast")


def test_segment_batch_rejects_inconsistent_shapes():
    q = torch.zeros(1, 2, 3, 4, 8)
    k = torch.zeros(1, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="segment keys"):
        SegmentBatch(q, k, k, None, None, torch.zeros(2, 2, dtype=torch.long), q_offset=0)
    with pytest.raises(ValueError, match="prefix_len"):
        SegmentBatch(q, k, k, None, None, torch.zeros(2, 1, dtype=torch.long), q_offset=1)
    b = SegmentBatch(q, k, k, torch.zeros(1, 2, 5, 2, 8), torch.zeros(1, 2, 5, 2, 8),
                     torch.zeros(2, 2, dtype=torch.long), q_offset=1)
    assert b.prefix_slots == 5 and b.heads_per_group == 2


def test_pretrain_flag_selects_the_process_default(monkeypatch):
    import importlib.util

    from megaseg.config import ConfigError
    from megaseg.training.arguments import PretrainConfig, parse_args

    assert parse_args([]).attention_kernel == "auto"
    with pytest.raises(ConfigError, match="allowed: auto, sdpa, triton"):
        PretrainConfig(attention_kernel="flash")
    # pretrain_gpt.run sets the process default before it prepares data or builds a model.
    spec = importlib.util.spec_from_file_location("pretrain_gpt_flag", REPO / "pretrain" / "pretrain_gpt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    class Reached(Exception):
        pass

    def stop(cfg):
        raise Reached(kernels.get_default())

    monkeypatch.setattr(kernels, "_default", "auto")
    monkeypatch.setattr(script, "resolve_data", stop)
    with pytest.raises(Reached, match="^sdpa$"):
        script.run(parse_args(["--attention-kernel", "sdpa"]))
