"""Activation recompute that keeps TBPTT-K exact.

megatron's recompute (`tensor_parallel.checkpoint`, a reentrant autograd function) runs the
checkpointed layers under ``no_grad`` and rebuilds their graph in the backward. A segmented
attention layer also *outputs* its carried KV tail, as state for the next segment (through
`SegmentStates`, not through the function's return value), so under megatron's recompute
that tail would have no graph and TBPTT-K would silently drop every gradient that crosses a
segment boundary.

Here the same recompute settings (``recompute_granularity`` full with ``recompute_method``
uniform/block and ``recompute_num_layers``; selective with ``recompute_modules``
including ``core_attn``) run through PyTorch's non-reentrant checkpoint instead: the forward
builds the ordinary graph — the tails keep theirs — but stores only each checkpointed
function's inputs; the backward re-runs the function to refill the activations it needs.
Every path of the L_K gradient is therefore the no-recompute one, evaluated on recomputed
values (which are bitwise the forward's: the operator is deterministic and has no dropout).

A re-run must not repeat the forward's side effects (`megaseg.ops.recompute.recomputing()`):
the state carrier (`SegmentStates.put`), the statistics recorder and the context-parallel
messages (`megaseg.parallel.context.SequenceChunk`: a re-run replays what the forward
received instead of exchanging messages again) check it. A backward that crosses a
checkpointed function K + 1 times (TBPTT-K pushes) re-runs it K + 1 times.
"""
from __future__ import annotations

import types

from megaseg.ops.recompute import checkpoint

def install(gpt) -> None:
    """Route the GPTModel's recompute through `checkpoint` (see the module docstring); a no-op
    when its TransformerConfig asks for no recompute."""
    config = gpt.config
    if config.recompute_granularity == "full":
        gpt.decoder._checkpointed_forward = types.MethodType(_checkpointed_forward, gpt.decoder)
    modules = config.recompute_modules or [] if config.recompute_granularity == "selective" else []
    if "core_attn" in modules:
        for layer in gpt.decoder.layers:
            layer.self_attention._checkpointed_attention_forward = types.MethodType(
                _checkpointed_attention_forward, layer.self_attention)


def _checkpointed_forward(self, hidden_states, attention_mask, context, context_mask, rotary_pos_emb, attention_bias,
                          packed_seq_params, use_inner_quantization_context, padding_mask=None):
    """`TransformerBlock._checkpointed_forward` with megatron's uniform/block grouping, each
    group through `checkpoint`."""
    config = self.config

    def run_layers(start: int, end: int):
        def forward(hidden_states, context):
            for index in range(start, end):
                hidden_states, context = self._get_layer(index)(
                    hidden_states=hidden_states, attention_mask=attention_mask, context=context,
                    context_mask=context_mask, rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                    inference_context=None, packed_seq_params=packed_seq_params, padding_mask=padding_mask)
            return hidden_states, context
        return forward

    n, step = self.num_layers_per_pipeline_rank, config.recompute_num_layers
    if config.recompute_method == "uniform":
        for start in range(0, n, step):
            hidden_states, context = checkpoint(run_layers(start, min(start + step, n)), hidden_states, context)
    elif config.recompute_method == "block":
        for index in range(n):
            forward = run_layers(index, index + 1)
            if index < step:
                hidden_states, context = checkpoint(forward, hidden_states, context)
            else:
                hidden_states, context = forward(hidden_states, context)
    else:
        raise ValueError(f"recompute_method={config.recompute_method!r} is invalid: use 'uniform' or 'block'")
    return hidden_states


def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None, attn_mask_type=None,
                                    attention_bias=None, packed_seq_params=None):
    """`Attention._checkpointed_attention_forward` (selective recompute of core attention)
    through `checkpoint`."""
    mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type

    def forward(query, key, value):
        return self.core_attention(query, key, value, attention_mask, attn_mask_type=mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)

    return checkpoint(forward, query, key, value)

