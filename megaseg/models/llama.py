"""Reference causal LM: the Llama architecture with the segmented operator as attention.

Plain PyTorch, single process, no parallelism inside (torchtitan style). Parameter names
follow Hugging Face's ``LlamaForCausalLM`` so weights map one to one. The megatron model,
the inference engine and HF export are all checked against this module.

Shape legend: B batch, L tokens, E hidden, H query heads, G KV heads, D head dim, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaseg.config import ModelConfig
from megaseg.ops.decode import DecodeStep
from megaseg.ops.norm import RMSNorm
from megaseg.ops.segmented_attention import LayerState, SegmentedAttention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.core = SegmentedAttention(
            cfg.head_plan.layer(layer), cfg.segment, cfg.rope, cfg.head_dim, cfg.heads_per_group
        )
        self.core.layer_index = layer

    def forward(self, x_BLE, state: LayerState | DecodeStep | None):
        B, L, _ = x_BLE.shape
        xq_BLHD = self.q_proj(x_BLE).view(B, L, self.num_heads, self.head_dim)
        xk_BLGD = self.k_proj(x_BLE).view(B, L, self.num_kv, self.head_dim)
        xv_BLGD = self.v_proj(x_BLE).view(B, L, self.num_kv, self.head_dim)
        if isinstance(state, DecodeStep):
            # A decode step the caller asked for (the inference engine): the state object
            # runs the core's decode entry point instead of its forward.
            out_BLHD, state = state.attend(self.core, xq_BLHD, xk_BLGD, xv_BLGD)
        else:
            out_BLHD, state = self.core(xq_BLHD, xk_BLGD, xv_BLGD, state)
        return self.o_proj(out_BLHD.reshape(B, L, -1)), state


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, state):
        h, state = self.self_attn(self.input_layernorm(x), state)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), state


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids_BL, states):
        x = self.embed_tokens(input_ids_BL)
        new_states = []
        for layer, state in zip(self.layers, states):
            x, state = layer(x, state)
            new_states.append(state)
        return self.norm(x), new_states


class SegmentedLlamaForCausalLM(nn.Module):
    """forward(input_ids [B, L], states) -> (logits [B, L, V], states).

    ``states`` is a list with one LayerState per layer (None = start of the sequence). Any
    split of a sequence into calls gives the same logits: one call over the whole sequence
    is the training forward, one call per segment is prefill, one call per token is decode.
    A `megaseg.ops.decode.DecodeStep` in place of a layer's state asks for the operator's
    buffered decode of one token (`megaseg.inference.engine` does).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def initial_states(self) -> list[LayerState]:
        return [LayerState() for _ in range(self.config.num_layers)]

    def forward(self, input_ids_BL: torch.Tensor, states: list[LayerState] | None = None):
        hidden, states = self.model(input_ids_BL, states or self.initial_states())
        return self.lm_head(hidden), states
