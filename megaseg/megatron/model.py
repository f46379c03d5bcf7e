"""The megatron-core GPTModel with segmented attention, and its segment-level forward.

    model = build_model(cfg)                                   # after initialize_model_parallel
    logits_BLV, states = segment_forward(model, ids_BL, states)  # same contract as the reference
    tbptt_backward(lambda ids, st: segment_forward(model, ids, st), ids_BT, S, k)

The model is megatron's own GPTModel (Llama layout: RMSNorm, SwiGLU, no biases, RoPE inside
the segmented operator); only its `core_attention` is megaseg's. Cross-segment state goes
in and out through a `SegmentStates` passed as ``packed_seq_params`` (see
megaseg.megatron.attention for why that argument).

Shape legend: B batch, L tokens, V vocabulary (cfg.vocab_size, unpadded).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from megaseg.config import ConfigError, ModelConfig
from megaseg.megatron.attention import SegmentStates
from megaseg.megatron.convert import DEFAULT_VOCAB_MULTIPLE, padded_vocab_size
from megaseg.megatron import recompute
from megaseg.megatron.layer_spec import get_segmented_block_spec, resolve_use_te
from megaseg.ops.segmented_attention import LayerState

# TransformerConfig fields that ModelConfig decides; overriding them would build a model
# the reference, the converter and the head plan disagree with.
_FROM_MODEL_CONFIG = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func",
    "add_bias_linear", "add_qkv_bias",
)  # fmt: skip


def _parallel_sizes() -> dict:
    if not parallel_state.model_parallel_is_initialized():
        return {}
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        # megaseg's context parallelism (megaseg.parallel.context) is not megatron's: the
        # TransformerConfig keeps context_parallel_size=1 and the CP group comes from
        # parallel_state.
    }


def transformer_config_from(cfg: ModelConfig, **overrides) -> TransformerConfig:
    """megatron TransformerConfig for ``cfg``; ``overrides`` set any other field.

    Parallel sizes default to those of the initialized megatron parallel state. Rejected
    (ConfigError): overriding a field ModelConfig decides (_FROM_MODEL_CONFIG), attention
    dropout, megatron context parallelism, and recompute settings whose megatron code path
    would re-run attention outside megaseg's recompute (megaseg.megatron.recompute), which
    keeps the carried tails' gradient.
    """
    params_dtype = overrides.pop("params_dtype", torch.float32)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # megatron-core's SwiGLU with a hand-written backward (no bias here): fewer kernels
        # and saved tensors than autograd through silu(a) * b, on CPU as on GPU.
        bias_activation_fusion=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        **_parallel_sizes(),
    )
    for name in _FROM_MODEL_CONFIG:
        if name in overrides and overrides[name] != kwargs[name]:
            raise ConfigError(
                f"{name}={overrides[name]!r} is invalid: it is fixed by the ModelConfig ({kwargs[name]!r}); "
                "change the ModelConfig"
            )
    kwargs.update(overrides)
    if kwargs["attention_dropout"]:
        raise ConfigError(
            f"attention_dropout={kwargs['attention_dropout']!r} is invalid: segmented attention has no dropout; use 0.0"
        )
    if kwargs.get("context_parallel_size", 1) != 1:
        raise ConfigError(
            f"context_parallel_size={kwargs['context_parallel_size']} is invalid: megatron's context parallel "
            "cannot run segmented attention; megaseg's runs with TransformerConfig context_parallel_size=1 "
            "(megaseg.parallel.context)"
        )
    config = TransformerConfig(**kwargs)
    if config.recompute_granularity is not None and (config.distribute_saved_activations or config.fp8
                                                     or config.fp4 or config.cpu_offloading):
        raise ConfigError(
            f"recompute_granularity={config.recompute_granularity!r} is invalid with distribute_saved_activations, "
            "fp8/fp4 or cpu_offloading: megaseg's recompute (which keeps the carried tails' gradient) runs "
            "neither; turn those off"
        )
    return config


def build_model(
    cfg: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: bool | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
) -> GPTModel:
    """megatron-core GPTModel of ``cfg`` with segmented attention, for this rank and stage.

    Needs megatron's model-parallel state (megaseg.megatron.parallel.initialize_model_parallel).
    The TransformerConfig is `transformer_config_from(cfg, params_dtype=params_dtype,
    **config_overrides)` (e.g. ``{"sequence_parallel": True}``). The embedding and output layer have
    `padded_vocab_size(cfg.vocab_size, tp, vocab_multiple)` rows; `segment_forward`
    returns logits for the first cfg.vocab_size only. ``use_te=None`` uses Transformer
    Engine when it imports.
    """
    config = transformer_config_from(cfg, params_dtype=params_dtype, **dict(config_overrides or {}))
    use_te = resolve_use_te(use_te)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_segmented_block_spec(cfg, config, use_te=use_te),
        vocab_size=padded_vocab_size(cfg.vocab_size, tp_size, vocab_multiple),
        max_sequence_length=cfg.segment.max_rope_position + 1,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="none",
    )
    # segment_forward needs the unpadded vocabulary; this is configuration, not state.
    model.megaseg_config = cfg
    recompute.install(model)
    return model


def layer_indices(model) -> list[int]:
    """Global 0-based indices of the transformer layers this model (stage) holds."""
    gpt = unwrap_model(model)
    return [layer.layer_number - 1 for layer in gpt.decoder.layers]


def segment_forward(
    model, input_ids_BL: torch.Tensor, states: list[LayerState | None] | None = None
) -> tuple[torch.Tensor, list[LayerState]]:
    """Run a span of tokens through the whole model: (logits [B, L, V], states after it).

    The contract of `SegmentedLlamaForCausalLM.forward`: ``states`` has one LayerState per
    layer (None = start of the sequence), and any split of a sequence into calls gives the
    same logits. With tensor parallelism every rank passes the same tokens, gets the full
    (gathered) logits and its own KV groups' states. Pipeline stages call the model with
    a `SegmentStates` themselves; this function needs a model that is all stages.
    """
    gpt = unwrap_model(model)
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError(
            "segment_forward needs a model with pre_process and post_process (no pipeline split); "
            "a pipeline stage is called with packed_seq_params=SegmentStates(...) directly"
        )
    layers = layer_indices(gpt)
    carrier = SegmentStates.start(layers, states)
    logits_BLV = model(
        input_ids_BL,
        position_ids=None,
        attention_mask=None,
        packed_seq_params=carrier,
        runtime_gather_output=True,
    )
    return logits_BLV[..., : gpt.megaseg_config.vocab_size], carrier.next_states(layers)
