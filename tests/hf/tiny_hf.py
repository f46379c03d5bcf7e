"""Tiny random Hugging Face Llama checkpoints built locally (no downloads)."""
import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]

STYLES = {
    # Llama-2: multi-head attention, theta 1e4, no rope scaling, untied head.
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rope_scaling=None,
                   tie_word_embeddings=False, max_position_embeddings=128),
    # Llama-3.x: GQA, theta 5e5, llama3 rope scaling (short original context so it bites), tied head.
    "llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   tie_word_embeddings=True, max_position_embeddings=256),
    # Linear position interpolation, GQA with one KV head.
    "linear": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=10000.0,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=False,
                   max_position_embeddings=128),
}


def hf_llama(style: str, seed: int = 0, num_layers: int = 3) -> LlamaForCausalLM:
    kw = dict(STYLES[style])
    theta, scaling = kw.pop("rope_theta"), kw.pop("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                      rms_norm_eps=1e-5, rope_parameters=rope, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # far from the 0.02 init so attention and retrieval are not flat
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if ("q_proj" in name or "k_proj" in name or "embed" in name) else 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return model


def load_tool(name: str):
    """A tools/ script as a module (its main(argv) is called in-process)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
