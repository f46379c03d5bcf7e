"""Peak prefill memory of full attention and of megaseg, predicted from the model shape.

Batch 1, a T-token prompt, weights and activations in one dtype (b bytes per element).

* ``mode="full"`` — standard full attention as transformers' ``LlamaForCausalLM`` runs it
  with ``attn_implementation="sdpa"``: one causal flash-kernel call per layer (no T x T
  matrix or mask), a ``DynamicCache`` holding the rotated keys and the values of all T
  tokens in every layer, one cos/sin table of T rows shared by the layers, and the input
  embeddings kept for the whole forward.
* ``mode="megaseg"`` — ``InferenceEngine.prefill``: the prompt streams in segment-aligned
  chunks of L = min(S, T) tokens through the reference model and the segmented operator.

Peak = weights + KV state + retrieval pool + activations + rotary tables. Activations are
the larger of two moments of one decoder layer over L tokens (L = T for full attention),
counted from what the code keeps alive (E hidden, F intermediate, Hd = query heads x D,
Gd = KV heads x D, per token):

* MLP: the layer input (held by the caller), the residual sum, the normalised input, and
  silu(gate), up and their product — 3E + 3F.
* attention, full: layer input, normalised input, q, k, v, the rotated q and the three
  temporaries of rotating k — 2E + 2Hd + 5Gd; or, later, rotated q/k, v, the kernel output
  and its contiguous copy — 2E + 3Hd + 2Gd; whichever is larger.
* attention, megaseg, per access mode m of the layer (h_m query and g_m KV elements, P_m
  prefix rows: M for `local`, R for `retrieval`, 0 for `segment` and for the first
  segment): layer input, normalised input, q, k, v; the mode's gathered q/k/v when the
  layer mixes modes; the outputs of modes already done; rotated q, its contiguous copy in
  the kernel, the output; keys and values with the prefix in front — (L + P_m)/L * 2 g_m;
  and the masks: an L x L bool causal mask, and with a prefix an L x (L + P_m) bool mask
  that the kernel turns into an additive mask of the same size in the compute dtype.

The KV state during megaseg prefill is the tails, retrieved prefixes and the open part of
the last segment; the pool of each retrieval layer holds all closed tokens, and the layer
that closes a segment briefly holds its old and its new pool. Rotary tables are per layer
and grow by doubling: 2S rows once a prefix is used. The benchmark
(tools/bench_inference.py) checks these predictions against measured peak RSS.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, ModelConfig

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of peak prefill memory; ``total`` is their sum."""

    weights: int
    kv: int  # full: the KV cache; megaseg: tails, retrieved prefixes and the open segment
    pool: int  # megaseg: retrieval-head history, incl. one layer's copy while it grows
    activations: int  # the larger of the attention / MLP moments of one layer
    rope_tables: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.pool + self.activations + self.rope_tables

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def dtype_bytes(dtype: torch.dtype) -> int:
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype} is not modelled: use float32, bfloat16 or float16")
    return _DTYPE_BYTES[dtype]


def parameter_count(cfg: ModelConfig) -> int:
    E, F, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    attn = 2 * E * cfg.num_heads * D + 2 * E * cfg.num_kv_heads * D
    layer = attn + 3 * E * F + 2 * E
    head = 0 if cfg.tie_word_embeddings else V * E
    return V * E + cfg.num_layers * layer + E + head


def _mlp_bytes(cfg: ModelConfig, L: int, b: int) -> int:
    return L * (3 * cfg.hidden_size + 3 * cfg.intermediate_size) * b


def _full_attention_bytes(cfg: ModelConfig, T: int, b: int) -> int:
    E, Hd, Gd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return T * max(2 * E + 2 * Hd + 5 * Gd, 2 * E + 3 * Hd + 2 * Gd) * b


def _segmented_attention_bytes(cfg: ModelConfig, modes, prefix: dict[str, int], L: int, b: int) -> int:
    """Peak bytes of one layer's attention over a chunk of L tokens (see module docstring)."""
    E, D, hpg = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group
    G = len(modes)
    Hd, Gd = G * hpg * D, G * D
    base = L * (2 * E + Hd + 2 * Gd) * b
    done = 0  # outputs of modes already attended
    peak = 0
    present = [m for m in (LOCAL, RETRIEVAL, SEGMENT) if m in modes]
    for m in present:
        g = sum(mm == m for mm in modes)
        hm, gm = g * hpg * D, g * D
        P = prefix.get(m, 0)
        gathered = 0 if g == G else hm + 2 * gm
        tensors = L * (gathered + 3 * hm) + (L + P) * 2 * gm
        masks = L * L + (L * (L + P) * (1 + b) if P else 0)
        peak = max(peak, base + done + tensors * b + masks)
        done += L * hm * b
    if len(present) > 1:
        peak = max(peak, base + done + 2 * L * Hd * b)  # concat of the modes and the un-permute
    return peak


def predict_prefill_memory(cfg: ModelConfig, T: int, dtype: torch.dtype = torch.float32,
                           mode: str = "megaseg") -> MemoryEstimate:
    """Predicted peak memory of prefilling a T-token prompt (batch 1).

    ``mode="megaseg"`` uses cfg's segment settings and head plan; ``mode="full"`` the same
    weights with full causal attention and a full KV cache (segment settings ignored).
    """
    if mode not in ("megaseg", "full"):
        raise ValueError(f"mode={mode!r} is invalid: 'megaseg' or 'full'")
    if not isinstance(T, int) or T <= 0:
        raise ValueError(f"T={T!r} must be an integer > 0")
    b = dtype_bytes(dtype)
    D, Lyr, E = cfg.head_dim, cfg.num_layers, cfg.hidden_size
    weights = parameter_count(cfg) * b
    if mode == "full":
        kv = 2 * Lyr * T * cfg.num_kv_heads * D * b
        act = max(_full_attention_bytes(cfg, T, b), _mlp_bytes(cfg, T, b)) + T * E * b  # + kept embeddings
        return MemoryEstimate(weights, kv, 0, act, 2 * T * D * b)

    S, M, R = cfg.segment.segment_length, cfg.segment.tail_length, cfg.segment.retrieval_length
    L = min(S, T)
    closed = (T // S) * S  # tokens of closed segments once the prompt is in
    open_len = T - closed
    kv = pool = largest_pool = 0
    attention = 0
    for layer in range(Lyr):
        modes = cfg.head_plan.layer(layer)
        n_local = sum(m == LOCAL for m in modes)
        n_ret = sum(m == RETRIEVAL for m in modes)
        kv += 2 * ((M if closed else 0) * n_local + (min(R, closed) * n_ret) + open_len * len(modes)) * D * b
        layer_pool = 2 * closed * n_ret * D * b
        pool += layer_pool
        largest_pool = max(largest_pool, layer_pool)
        prefix = {LOCAL: M, RETRIEVAL: R} if T > S else {}
        attention = max(attention, _segmented_attention_bytes(cfg, modes, prefix, L, b))
    act = max(attention, _mlp_bytes(cfg, L, b))
    rows = 2 * S if T > S and max(M, R) else L  # rotary tables double from S to 2S
    return MemoryEstimate(weights, kv, pool + largest_pool, act, Lyr * 2 * rows * D * b)
