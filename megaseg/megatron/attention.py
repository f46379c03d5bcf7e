"""megatron-core `core_attention` that runs megaseg's segmented operator, and the object
that carries cross-segment state through a GPTModel forward.

megatron's `SelfAttention` projects hidden states to q/k/v, would apply its own rotary
embedding (disabled here: GPTModel is built with position_embedding_type='none', so
`rotary_pos_emb` is None) and calls

    core_attention(query [sq, b, np, hn], key [sq, b, ng, hn], value, attention_mask,
                   attn_mask_type=..., attention_bias=..., packed_seq_params=...)

expecting [sq, b, np * hn] back. `SegmentedCoreAttention` transposes to batch-first and
calls `SegmentedAttention`, which applies RoPE with per-segment positions (docs/semantics.md §3).

Cross-segment state rides in `packed_seq_params`: it is the one per-call argument that
megatron threads unchanged from `GPTModel.forward` through `TransformerBlock`,
`TransformerLayer` and `SelfAttention` to `core_attention`, and GPTModel only reads it for
its rotary embedding, which is off. `SegmentStates` subclasses `PackedSeqParams` with
qkv_format='sbhd', so every check megatron makes on it (`qkv_format == 'thd'`) takes the
ordinary-batch branch. The states of a call are owned by whoever builds the
`SegmentStates` (the training or inference engine, one per pipeline stage and call);
nothing is stored on the model between calls.

Shape legend: L tokens of the run (megatron's sq), B batch, H query heads and G KV groups
of this tensor-parallel rank, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from megaseg.config import LOCAL, ConfigError, ModelConfig
from megaseg.ops.recompute import recomputing
from megaseg.ops.segmented_attention import LayerState, SegmentedAttention


@dataclass
class SegmentStates(PackedSeqParams):
    """Cross-segment state of one pipeline stage for one forward call.

    Pass it as ``packed_seq_params`` to ``GPTModel.forward``. ``inputs`` maps a global
    0-based layer index to the `LayerState` before this call (None or missing = start of
    the sequence); each segmented attention layer reads its entry and records the state
    after the call in ``outputs``. Inputs are never modified, so a forward that is run
    again sees the same state.
    """

    inputs: dict[int, LayerState | None] = field(default_factory=dict)
    outputs: dict[int, LayerState] = field(default_factory=dict)
    qkv_format: str = "sbhd"
    # A context-parallel call (megaseg.parallel.context.SequenceChunk): every layer runs its
    # chunk of whole sequences with the neighbours' help; no state goes in or out.
    chunk: object = None

    @classmethod
    def start(cls, layers: Sequence[int], states: Sequence[LayerState | None] | None) -> "SegmentStates":
        """Carrier for ``states[i]`` of global layer ``layers[i]`` (states None = all fresh)."""
        if states is None:
            return cls(inputs={layer: None for layer in layers})
        if len(states) != len(layers):
            raise ValueError(f"got {len(states)} layer states for a model (stage) with {len(layers)} layers")
        return cls(inputs=dict(zip(layers, states)))

    def input(self, layer: int) -> LayerState | None:
        return self.inputs.get(layer)

    def put(self, layer: int, state: LayerState) -> None:
        if not recomputing():  # a recompute's states are the forward's, already taken
            self.outputs[layer] = state

    def next_states(self, layers: Iterable[int]) -> list[LayerState]:
        """The states after the call, in the order of ``layers``."""
        layers = list(layers)
        missing = [layer for layer in layers if layer not in self.outputs]
        if missing:
            raise RuntimeError(f"no segmented attention ran for layers {missing} in this forward call")
        return [self.outputs[layer] for layer in layers]


class SegmentedCoreAttention(MegatronModule):
    """megatron `core_attention` for one layer: this TP rank's KV groups of the head plan.

    Built by `SelfAttention` through the layer spec with ``model_config`` bound in the
    spec's params. The head plan is global; tensor-parallel rank r of t owns KV groups
    [r * G/t, (r+1) * G/t) (megatron's fused QKV is split by whole query groups) and runs
    the operator on that slice of the plan.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection=None,
        *,
        model_config: ModelConfig,
    ):
        super().__init__(config=config)
        cfg = model_config
        if attention_type != "self":
            raise ConfigError(
                f"attention_type={attention_type!r} is invalid: segmented attention is self-attention only"
            )
        if softmax_scale is not None and not math.isclose(softmax_scale, 1.0 / math.sqrt(cfg.head_dim)):
            raise ConfigError(f"softmax_scale={softmax_scale!r} is invalid: segmented attention uses 1/sqrt(head_dim)")
        if config.attention_dropout:
            raise ConfigError(
                f"attention_dropout={config.attention_dropout!r} is invalid: segmented attention has no dropout; use 0.0"
            )
        if pg_collection is not None:
            tp_group = pg_collection.tp
            tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        else:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if cfg.num_kv_heads % tp_size:
            # With fewer KV groups than ranks megatron splits a group's query heads across
            # ranks; a retrieval group's scores sum over all its heads, so that split is refused.
            raise ConfigError(
                f"tensor_model_parallel_size={tp_size} is invalid: it must divide num_kv_heads={cfg.num_kv_heads}"
            )
        self.layer_index = layer_number - 1
        if not 0 <= self.layer_index < cfg.num_layers:
            raise ConfigError(f"layer_number={layer_number} is outside the head plan's {cfg.num_layers} layers")
        per_rank = cfg.num_kv_heads // tp_size
        self.kv_groups = (tp_rank * per_rank, (tp_rank + 1) * per_rank)
        modes = cfg.head_plan.slice_groups(*self.kv_groups).layer(self.layer_index)
        self.operator = SegmentedAttention(modes, cfg.segment, cfg.rope, cfg.head_dim, cfg.heads_per_group)
        self.operator.layer_index, self.operator.group_offset = self.layer_index, self.kv_groups[0]
        self.segment_length = cfg.segment.segment_length
        # Another TP rank carries a gradient-bearing tail in this layer but this one does not.
        self.placeholder_tail = (
            cfg.segment.tail_length > 0 and LOCAL in cfg.head_plan.layer(self.layer_index) and LOCAL not in modes
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, kv_groups=[{self.kv_groups[0]}, {self.kv_groups[1]})"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query [L, B, H, D], key/value [L, B, G, D] -> [L, B, H * D].

        ``attention_mask`` is ignored: the operator builds its own causal-per-segment
        masks. Without a `SegmentStates` the call is a run from the start of a sequence
        and its end state is dropped (one-pass training forward).
        """
        if attention_bias is not None:
            raise ValueError("segmented attention does not take an attention_bias")
        states = packed_seq_params
        if states is not None and not isinstance(states, SegmentStates):
            raise ValueError(
                "segmented attention got a PackedSeqParams: packed (thd) sequences are not supported; "
                "pass a SegmentStates (or None) as packed_seq_params"
            )
        q_BLHD = query.transpose(0, 1)
        k_BLGD = key.transpose(0, 1)
        v_BLGD = value.transpose(0, 1)
        L, B = query.shape[0], query.shape[1]
        if states is not None and states.chunk is not None:
            states.chunk.begin_layer(self.layer_index)
            out_BLHD, _ = self.operator(q_BLHD, k_BLGD, v_BLGD, chunk=states.chunk)
            if self.placeholder_tail:
                states.chunk.placeholder(self.layer_index, L, k_BLGD[:, :0, :0])
            return out_BLHD.transpose(0, 1).reshape(L, B, -1)
        state = states.input(self.layer_index) if states is not None else None
        out_BLHD, new_state = self.operator(q_BLHD, k_BLGD, v_BLGD, state)
        if self.placeholder_tail:
            out_BLHD = self._link_placeholder_tail(out_BLHD, state, new_state, k_BLGD, v_BLGD)
        if states is not None:
            states.put(self.layer_index, new_state)
        return out_BLHD.transpose(0, 1).reshape(L, B, -1)

    def _link_placeholder_tail(self, out_BLHD, state, new_state, k_BLGD, v_BLGD):
        """Give a rank without `local` groups an empty tail wired like a real one.

        Backpropagating a carried tail into the previous segment's graph runs the
        tensor-parallel all-reduces of every layer at or below the tail's layer. Each
        rank must run the same collectives, so a rank whose slice of a layer has no
        `local` group still carries a tail: an empty [B, 0, 0, D] slice of its keys/values
        (gradient path into this segment's QKV projection), consumed by the next call
        through a zero-weighted term on the attention output (so it receives a
        cotangent). Values are unchanged: the term is exactly zero.
        """
        if state is not None and state.tail_k is not None and state.tail_k.requires_grad:
            out_BLHD = out_BLHD + (state.tail_k.sum() + state.tail_v.sum()) * 0.0
        before = state.tokens if state is not None else 0
        if new_state.tokens // self.segment_length > before // self.segment_length:
            new_state.tail_k, new_state.tail_v = k_BLGD[:, :0, :0], v_BLGD[:, :0, :0]
        return out_BLHD
