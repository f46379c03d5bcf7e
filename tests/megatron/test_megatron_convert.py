"""Reference (HF Llama names) <-> megatron GPTModel weight mapping, with TP slicing."""
import pytest
import torch

from megaseg.megatron.convert import (
    ConversionError,
    megatron_to_reference,
    padded_vocab_size,
    reference_to_megatron,
)
from megaseg.models.llama import SegmentedLlamaForCausalLM


def _reference_state(cfg, seed=0):
    torch.manual_seed(seed)
    return SegmentedLlamaForCausalLM(cfg).state_dict()


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("te_layout", [False, True], ids=["local", "te"])
def test_round_trip_is_exact(make_cfg, tp_size, tied, te_layout):
    cfg = make_cfg(tied)
    ref = _reference_state(cfg)
    shards = [reference_to_megatron(ref, cfg, r, tp_size, te_layout=te_layout) for r in range(tp_size)]
    back = megatron_to_reference(shards, cfg)
    assert back.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(back[name], t), name


def test_fused_qkv_is_laid_out_per_query_group_and_split_by_whole_groups(make_cfg):
    cfg = make_cfg()
    E, D, hpg = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group
    ref = _reference_state(cfg)
    q = ref["model.layers.1.self_attn.q_proj.weight"]
    k = ref["model.layers.1.self_attn.k_proj.weight"]
    v = ref["model.layers.1.self_attn.v_proj.weight"]
    rank1 = reference_to_megatron(ref, cfg, 1, 2)["decoder.layers.1.self_attention.linear_qkv.weight"]
    # Rank 1 of 2 owns KV groups 2 and 3; its first block is group 2: [q heads 4, 5 ; k_2 ; v_2].
    block = rank1[: (hpg + 2) * D]
    assert torch.equal(block[: hpg * D], q[2 * hpg * D : 3 * hpg * D])
    assert torch.equal(block[hpg * D : (hpg + 1) * D], k[2 * D : 3 * D])
    assert torch.equal(block[(hpg + 1) * D :], v[2 * D : 3 * D])
    assert rank1.shape == (2 * (hpg + 2) * D, E)


def test_gated_mlp_fc1_is_gate_then_up_per_rank(make_cfg):
    cfg = make_cfg()
    ref = _reference_state(cfg)
    F = cfg.intermediate_size
    fc1 = reference_to_megatron(ref, cfg, 1, 2)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: F // 2], ref["model.layers.0.mlp.gate_proj.weight"][F // 2 :])
    assert torch.equal(fc1[F // 2 :], ref["model.layers.0.mlp.up_proj.weight"][F // 2 :])


def test_vocabulary_is_padded_with_zero_rows_and_split(make_cfg):
    cfg = make_cfg()
    ref = _reference_state(cfg)
    assert padded_vocab_size(101, 1) == 128 and padded_vocab_size(101, 2) == 256 and padded_vocab_size(256, 2) == 256
    shards = [reference_to_megatron(ref, cfg, r, 2) for r in range(2)]
    emb = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    out = torch.cat([s["output_layer.weight"] for s in shards])
    assert emb.shape == out.shape == (256, cfg.hidden_size)
    assert torch.equal(emb[:101], ref["model.embed_tokens.weight"]) and not emb[101:].any()
    assert torch.equal(out[:101], ref["lm_head.weight"]) and not out[101:].any()


def test_tied_model_has_no_output_layer_weight(make_cfg):
    cfg = make_cfg(tied=True)
    sd = reference_to_megatron(_reference_state(cfg), cfg, 0, 1)
    assert "output_layer.weight" not in sd


def test_mismatched_state_dicts_are_refused_with_the_weight_named(make_cfg):
    cfg = make_cfg()
    ref = _reference_state(cfg)
    bad = dict(ref)
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"][:-1]
    with pytest.raises(ConversionError, match="up_proj"):
        reference_to_megatron(bad, cfg, 0, 1)
    extra = dict(ref, **{"model.layers.3.input_layernorm.weight": torch.ones(cfg.hidden_size)})
    with pytest.raises(ConversionError, match="unexpected"):
        reference_to_megatron(extra, cfg, 0, 1)
    missing = {k: v for k, v in ref.items() if k != "model.norm.weight"}
    with pytest.raises(ConversionError, match="model.norm.weight"):
        reference_to_megatron(missing, cfg, 0, 1)
    with pytest.raises(ConversionError, match="num_kv_heads"):
        reference_to_megatron(ref, cfg, 0, 8)
