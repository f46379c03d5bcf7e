"""The exported directory under transformers: segmented logits and generate() with remote code."""
import json

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_modules
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from megaseg.config import HeadPlan, SegmentConfig
from megaseg.checkpoint.weights import load_model_dir as load_checkpoint
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint
from megaseg.inference import InferenceEngine

from .tiny_hf import hf_llama

S, M, R = 8, 3, 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(megaseg reference model, exported directory) for a Llama-3-style model with all three modes."""
    root = tmp_path_factory.mktemp("remote")
    patch = pytest.MonkeyPatch()
    # Keep transformers' copy of the modeling code inside the test's temporary directory.
    patch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(root / "modules"))
    hf = hf_llama("llama3", seed=5)
    hf.save_pretrained(root / "hf")
    plan = HeadPlan((("local", "segment"), ("retrieval", "local"), ("local", "segment")))
    import_hf_checkpoint(root / "hf", root / "ms", SegmentConfig(S, M, R, 1), plan)
    export_hf_checkpoint(root / "ms", root / "out")
    model, _ = load_checkpoint(root / "ms")
    yield model, root
    patch.undo()


def test_export_writes_remote_code_config_and_modeling_file(exported):
    _, root = exported
    cfg = json.loads((root / "out" / "config.json").read_text())
    assert cfg["model_type"] == "megaseg_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_megaseg.MegasegLlamaForCausalLM"
    assert cfg["megaseg"]["segment"] == {"segment_length": S, "tail_length": M, "retrieval_length": R, "tbptt_k": 1,
                                         "retrieval_group_reduce": "sum"}
    assert (root / "out" / "modeling_megaseg.py").is_file()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=False)


def test_exported_model_logits_equal_training_forward_past_the_segment_length(exported):
    model, root = exported
    remote = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    assert type(remote).__name__ == "MegasegLlamaForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (2, 5 * S + 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model(ids)
        got = remote(ids).logits
        plain = hf_llama("llama3", seed=5)(ids).logits  # full attention: must differ past S
    assert (got - want).abs().max().item() <= 1e-5
    assert (got[:, :S] - plain[:, :S]).abs().max().item() <= 1e-4
    assert (got[:, 2 * S :] - plain[:, 2 * S :]).abs().max().item() > 1e-2


def test_generate_greedy_equals_the_engine_for_a_left_padded_batch(exported):
    model, root = exported
    remote = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (5, 2 * S + 1, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    new = 3 * S
    out = remote.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    engine = InferenceEngine(model).generate(prompts, new)
    assert out[:, width:].tolist() == engine.tokens
    single = remote.generate(prompts[1][None], max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert single[0, len(prompts[1]):].tolist() == engine.tokens[1]


def test_plain_export_loads_in_stock_transformers_without_remote_code(exported):
    model, root = exported
    export_hf_checkpoint(root / "ms", root / "plain", segmented=False)
    cfg = json.loads((root / "plain" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not (root / "plain" / "modeling_megaseg.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(root / "plain")
    assert type(stock) is LlamaForCausalLM
    ids = torch.randint(0, model.config.vocab_size, (1, 4 * S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, hf_llama("llama3", seed=5)(ids).logits)


def test_beam_search_reorders_the_segmented_cache_like_a_kv_cache(exported):
    model, root = exported
    remote = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    plain = hf_llama("llama3", seed=5)
    prompt = torch.randint(3, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    # Prompt + new tokens stay within one segment, where segmented attention is full attention.
    kw = dict(max_new_tokens=S - 4, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote.generate(prompt, **kw), plain.generate(prompt, **kw))


def test_labels_give_the_mean_next_token_loss(exported):
    model, root = exported
    remote = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * S), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, _ = model(ids)
        loss = remote(ids, labels=ids).loss
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - want.item()) <= 1e-5


def test_generate_decodes_through_the_operators_decode_entry_point(exported, monkeypatch):
    """generate() keeps the segmented state and asks every layer's operator for its
    buffered one-token decode (not the run path) at each step after the prompt."""
    from megaseg.ops.segmented_attention import SegmentedAttention

    model, root = exported
    remote = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    calls = []
    real = SegmentedAttention.decode

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SegmentedAttention, "decode", counting)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    remote.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert len(calls) == 3 * model.config.num_layers  # the prompt's forward gives token 1; 3 decode steps
