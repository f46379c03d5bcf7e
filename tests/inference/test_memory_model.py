"""The prefill memory model: exact state terms, bounded megaseg memory, the paper's 7B ratio."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.inference import InferenceEngine
from megaseg.inference.memory_model import parameter_count, predict_prefill_memory

from .tiny import PLAN, random_ids, tiny_model


def _llama2_7b(plan=None):
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, segment=SegmentConfig(4096, 512, 512, 1),
                       head_plan=plan or HeadPlan.paper_llama2_7b())


@pytest.mark.parametrize("tie", [False, True])
def test_weights_term_counts_every_parameter(tie):
    model = tiny_model(seed=0)
    cfg = model.config.replace(tie_word_embeddings=tie)
    from megaseg.models.llama import SegmentedLlamaForCausalLM

    n = sum(p.numel() for p in SegmentedLlamaForCausalLM(cfg).parameters())
    assert parameter_count(cfg) == n
    assert predict_prefill_memory(cfg, 10, torch.bfloat16).weights == 2 * n


@pytest.mark.parametrize("T", [5, 8, 21, 40])
def test_megaseg_state_terms_equal_the_engine_state_after_prefill(T):
    model = tiny_model(seed=1, S=8, M=3, R=5, plan=PLAN)
    _, state = InferenceEngine(model).prefill(random_ids([T], model.config.vocab_size))
    est = predict_prefill_memory(model.config, T, torch.float32, "megaseg")
    held = state.nbytes()
    largest_layer_pool = max(2 * (T // 8) * 8 * sum(m == "retrieval" for m in layer) * 8 * 4 for layer in PLAN.modes)
    assert est.kv == held["bounded"]
    assert est.pool - largest_layer_pool == held["pool"]


def test_full_kv_term_equals_the_transformers_cache_after_prefill():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).eval()
    T = 37
    with torch.no_grad():
        out = hf(torch.randint(0, 64, (1, T)), use_cache=True)
    cache = out["cache"] if "cache" in out else out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    ours = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                       segment=SegmentConfig(8, 2, 0, 1))
    assert predict_prefill_memory(ours, T, torch.float32, "full").kv == held


def test_megaseg_memory_beyond_the_pool_does_not_grow_with_the_prompt():
    cfg = _llama2_7b()
    rest = {T: (e := predict_prefill_memory(cfg, T, torch.bfloat16)).total - e.pool for T in (8192, 32768, 131072, 1 << 20)}
    assert len(set(rest.values())) == 1
    pools = [predict_prefill_memory(cfg, T, torch.bfloat16).pool for T in (32768, 65536)]
    assert pools[1] == 2 * pools[0]


def test_full_over_megaseg_grows_with_length_and_is_about_6x_for_llama2_7b_at_128k():
    cfg = _llama2_7b()
    ratios = [predict_prefill_memory(cfg, T, torch.bfloat16, "full").total
              / predict_prefill_memory(cfg, T, torch.bfloat16, "megaseg").total for T in (8192, 32768, 65536, 131072)]
    assert ratios == sorted(ratios)
    assert ratios[0] < 1.5 and 5.0 <= ratios[-1] <= 7.0


@pytest.mark.parametrize("kwargs, message", [({"mode": "dense"}, "mode='dense'"), ({"T": 0}, "T=0"),
                                             ({"dtype": torch.int8}, "dtype=torch.int8")])
def test_bad_arguments_are_errors(kwargs, message):
    args = {"T": 16, "dtype": torch.float32, "mode": "megaseg", **kwargs}
    with pytest.raises(ValueError, match=message):
        predict_prefill_memory(tiny_model().config, args.pop("T"), **args)
