"""The segmented layer spec: megatron's GPT layer with core_attention replaced."""
import pytest

from megaseg.megatron import layer_spec
from megaseg.megatron.attention import SegmentedCoreAttention
from megaseg.megatron.norm import RMSNorm


def test_local_spec_uses_megatron_parallel_linears_and_segmented_core_attention(make_cfg):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    spec = layer_spec.get_segmented_layer_spec(make_cfg(), use_te=False)
    attn = spec.submodules.self_attention.submodules
    assert attn.linear_qkv is ColumnParallelLinear and attn.linear_proj is RowParallelLinear
    assert attn.core_attention.module is SegmentedCoreAttention
    assert attn.core_attention.params["model_config"] == make_cfg()
    assert spec.submodules.input_layernorm is RMSNorm and spec.submodules.pre_mlp_layernorm is RMSNorm
    assert spec.submodules.mlp.submodules.linear_fc1 is ColumnParallelLinear


def test_te_spec_fuses_norms_into_te_linears(make_cfg):
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer.identity_op import IdentityOp

    spec = layer_spec.get_segmented_layer_te_spec(make_cfg())
    attn = spec.submodules.self_attention.submodules
    assert attn.linear_qkv is te_ext.TELayerNormColumnParallelLinear
    assert attn.linear_proj is te_ext.TERowParallelLinear
    assert attn.core_attention.module is SegmentedCoreAttention
    assert spec.submodules.input_layernorm is IdentityOp and spec.submodules.pre_mlp_layernorm is IdentityOp
    assert spec.submodules.mlp.submodules.linear_fc1 is te_ext.TELayerNormColumnParallelLinear


def test_te_is_chosen_exactly_when_importable(monkeypatch, make_cfg):
    monkeypatch.setattr(layer_spec, "transformer_engine_available", lambda: True)
    assert layer_spec.resolve_use_te(None) is True
    monkeypatch.setattr(layer_spec, "transformer_engine_available", lambda: False)
    assert layer_spec.resolve_use_te(None) is False
    assert layer_spec.resolve_use_te(False) is False
    with pytest.raises(ImportError, match="use_te=False"):
        layer_spec.resolve_use_te(True)


def test_block_spec_ends_with_rmsnorm(make_cfg, model_parallel):
    from megaseg.megatron.model import transformer_config_from

    cfg = make_cfg()
    block = layer_spec.get_segmented_block_spec(cfg, transformer_config_from(cfg), use_te=False)
    assert len(block.layer_specs) == cfg.num_layers and block.layer_norm is RMSNorm
