"""megatron-core GPT layer specs with segmented attention as `core_attention`.

The layer is megatron's `TransformerLayer` + `SelfAttention` + gated `MLP` exactly as in
its GPT specs; only `core_attention` is replaced by `SegmentedCoreAttention`, which wraps
megaseg's one segmented operator. Two variants:

* local: `ColumnParallelLinear` / `RowParallelLinear` and megaseg's megatron-compatible
  `RMSNorm` (runs anywhere, including CPU/gloo);
* Transformer Engine: TE linears with the input norms fused into `linear_qkv` and
  `linear_fc1` (`TELayerNormColumnParallelLinear`), as megatron's TE spec does.

`use_te=None` picks TE when `transformer_engine` imports. The GPTModel using these specs
must be built with position_embedding_type='none' (RoPE is applied inside the operator
with per-segment positions); `megaseg.megatron.model.build_model` does that.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megaseg.config import ModelConfig
from megaseg.megatron.attention import SegmentedCoreAttention
from megaseg.megatron.norm import RMSNorm


def transformer_engine_available() -> bool:
    """Whether `transformer_engine` can be imported in this environment."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_use_te(use_te: bool | None) -> bool:
    """None -> TE when importable; True without TE is an error with the fix in it."""
    if use_te is None:
        return transformer_engine_available()
    if use_te and not transformer_engine_available():
        raise ImportError(
            "use_te=True needs transformer_engine, which is not importable here; "
            "install transformer-engine (GPU only) or pass use_te=False for the local spec"
        )
    return bool(use_te)


def segmented_core_attention_spec(cfg: ModelConfig) -> ModuleSpec:
    """`core_attention` submodule: the segmented operator bound to the model's head plan."""
    return ModuleSpec(module=SegmentedCoreAttention, params={"model_config": cfg})


def get_segmented_layer_local_spec(cfg: ModelConfig) -> ModuleSpec:
    """Transformer layer with megatron-core local modules and segmented attention."""
    backend = LocalSpecProvider()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=segmented_core_attention_spec(cfg),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
            # Checkpoints use TE's names, so local and TE models load each other's.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_segmented_layer_te_spec(cfg: ModelConfig) -> ModuleSpec:
    """Transformer layer with Transformer Engine modules and segmented attention."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    backend = TESpecProvider()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_layer_norm_linear(),
                    core_attention=segmented_core_attention_spec(cfg),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_segmented_layer_spec(cfg: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The segmented transformer layer spec; TE when ``use_te`` (None = when importable)."""
    if resolve_use_te(use_te):
        return get_segmented_layer_te_spec(cfg)
    return get_segmented_layer_local_spec(cfg)


def get_segmented_block_spec(
    cfg: ModelConfig,
    config: TransformerConfig,
    use_te: bool | None = None,
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage: its layers plus the final norm.

    megaseg runs no virtual (interleaved) pipeline stages: a stage is one contiguous run of
    num_layers / pipeline size layers. Given as a block (not a bare layer spec) so that the final norm is chosen here:
    megatron would otherwise pick its global default norm for it.
    """
    te = resolve_use_te(use_te)
    layer = get_segmented_layer_te_spec(cfg) if te else get_segmented_layer_local_spec(cfg)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
