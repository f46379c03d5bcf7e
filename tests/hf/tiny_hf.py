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


FAMILIES = {
    # Qwen2.5: GQA, q/k/v biases, theta 1e6, tied head, a window that is switched off.
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True,
                  max_position_embeddings=2048, use_sliding_window=False, sliding_window=64, max_window_layers=1,
                  bos_token_id=None, eos_token_id=2, pad_token_id=2),
    # Mistral-7B-v0.1 style: GQA, a sliding window (48 tokens here), untied head.
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                    max_position_embeddings=1024, sliding_window=48, bos_token_id=1, eos_token_id=2),
}


def hf_family(family: str, seed: int = 0, num_layers: int = 2, vocab_size: int = 101):
    """A tiny random model of a non-Llama family (transformers' own class), weights far from init."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[family]
    kw = dict(FAMILIES[family])
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    cfg = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                     rms_norm_eps=1e-6, rope_parameters=rope, **kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if ("q_proj" in name or "k_proj" in name or "embed" in name) else 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)  # biases that change the logits, so a lost bias fails the tests
            else:
                p.uniform_(0.5, 1.5)
    return model


def hf_tokenizer(directory, texts, vocab_size: int = 300, bos: str | None = "<|begin_of_text|>",
                 eos: str = "<|end_of_text|>", pad: str | None = None) -> Path:
    """A Llama-3-style Hugging Face tokenizer (byte-level BPE, only tokenizer.json and
    tokenizer_config.json) trained on ``texts``; special tokens get the first ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [t for t in (bos, eos, pad) if t is not None and t != eos] + [eos]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "model_max_length": 1000000, "clean_up_tokenization_spaces": False}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return d
