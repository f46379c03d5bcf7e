"""The parts of tools/gpu_check.py that run without a GPU: FLOP counting, the TE weight
renaming, and the whole script at tiny shapes (--smoke)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.ops import kernels

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _cfg(S=8, M=3, R=5, T_layers=3):
    return ModelConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=T_layers, num_heads=6, num_kv_heads=3,
        head_dim=8, segment=SegmentConfig(S, M, R, 1),
        head_plan=HeadPlan((("local", "retrieval", "segment"), ("local",) * 3, ("segment", "retrieval", "local"))),
    )


def test_matmul_params_are_the_models_linear_weights():
    cfg = _cfg()
    model = SegmentedLlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_check.matmul_params(cfg) == linear


@pytest.mark.parametrize("T", [8, 21, 40])
def test_attention_key_count_is_what_the_operator_attends(monkeypatch, T):
    """Count the keys every query attends to from the batches the operator hands to its
    kernel (prefill-style, one call per segment, so no padded queries), against the formula."""
    cfg = _cfg()
    seen = {}
    real = kernels.get_kernel

    def counting(name):
        attend = real(name)

        def wrapped(batch, rotary):
            hpg = batch.heads_per_group
            Q = batch.q.shape[2]
            offsets = torch.arange(batch.q_offset, batch.q_offset + Q)
            keys_per_head = (batch.prefix_len[:, :, None] + offsets + 1).sum() * hpg  # [N, G, Q] summed
            seen["keys"] = seen.get("keys", 0) + int(keys_per_head)
            return attend(batch, rotary)
        return wrapped

    monkeypatch.setattr(kernels, "get_kernel", counting)
    model = SegmentedLlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    S = cfg.segment.segment_length
    for layer in range(cfg.num_layers):
        seen.clear()
        core = model.model.layers[layer].self_attn.core
        state = None
        g = torch.Generator().manual_seed(layer)
        q, k, v = (torch.randn(1, T, n, 8, generator=g) for n in (6, 3, 3))
        for s in range(0, T, S):
            _, state = core(q[:, s : s + S], k[:, s : s + S], v[:, s : s + S], state)
        expected = gpu_check.segmented_keys_per_query(cfg, layer, T) * cfg.num_heads
        assert seen["keys"] == pytest.approx(expected), layer


def test_training_flops_formula():
    cfg = _cfg()
    T = 21
    n = gpu_check.matmul_params(cfg)
    hd = cfg.num_heads * cfg.head_dim
    full = gpu_check.training_flops(cfg, T, attention="full")
    assert full == 6 * n * T + 12 * hd * cfg.num_layers * T * (T + 1) / 2
    seg = gpu_check.training_flops(cfg, T, batch=2)
    keys = sum(gpu_check.segmented_keys_per_query(cfg, layer, T) for layer in range(3))
    assert seg == 2 * (6 * n * T + 12 * hd * keys)
    # T <= S: segmented attention is causal attention.
    assert gpu_check.training_flops(cfg, 8) == gpu_check.training_flops(cfg, 8, attention="full")
    assert gpu_check.peak_tflops("NVIDIA H200", None) == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == pytest.approx(756.0)
    assert gpu_check.peak_tflops("Some GPU", None) is None and gpu_check.peak_tflops("x", 100.0) == 100.0


def test_local_weights_rename_to_te_names():
    from megaseg.megatron import parallel
    from megaseg.megatron.model import build_model

    cfg = _cfg()
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1)
    try:
        state = build_model(cfg, use_te=False).state_dict()
    finally:
        parallel.destroy_model_parallel()
    renamed = gpu_check.local_to_te_state_dict(state, cfg)
    assert len(renamed) == len(state)
    changed = {k: v for k, v in renamed.items() if k not in state}
    for i in range(cfg.num_layers):
        assert renamed[f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"] is \
            state[f"decoder.layers.{i}.input_layernorm.weight"]
        assert renamed[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"] is \
            state[f"decoder.layers.{i}.pre_mlp_layernorm.weight"]
    assert len(changed) == 2 * cfg.num_layers
    assert "decoder.final_layernorm.weight" in renamed


def test_script_refuses_to_run_without_cuda_unless_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_smoke_run_completes_every_section(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--smoke", "--steps", "2",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert json.loads(proc.stdout) == summary
    for section in ("kernel", "te_vs_local", "train_megaseg", "train_stock", "inference_128k"):
        assert "error" not in summary[section], summary[section]
    for kind in ("train_megaseg", "train_stock"):
        run = summary[kind]
        assert run["tokens"] == 64 and run["tokens_per_s"] > 0 and len(run["losses"]) == 3
        assert run["losses"][-1] < run["losses"][0]  # the steps train
    assert summary["inference_128k"]["predicted_gib"] > 0
    assert set(summary["targets"]) >= {"kernel_matches_sdpa", "te_matches_local", "tbptt1_mfu_at_least_0.35"}
