"""Weights between the reference model (Hugging Face Llama names) and megatron's GPTModel.

Pure tensor mapping (no process groups needed), so checkpoint tools can reshard offline.

Reference (SegmentedLlamaForCausalLM / HF LlamaForCausalLM) -> megatron GPTModel, TP rank r of t:

    model.embed_tokens.weight [V, E]        embedding.word_embeddings.weight [Vp/t, E]   (rows padded to Vp)
    layers.i.input_layernorm.weight         decoder.layers.i.input_layernorm.weight       (replicated)
    layers.i.self_attn.{q,k,v}_proj.weight  decoder.layers.i.self_attention.linear_qkv.weight
                                                [G/t * (hpg + 2) * D, E]: per KV group g of this rank
                                                [q heads g*hpg .. g*hpg+hpg-1 ; k_g ; v_g]
    layers.i.self_attn.{q,k,v}_proj.bias    decoder.layers.i.self_attention.linear_qkv.bias [G/t * (hpg + 2) * D]
                                                (qkv_bias models, e.g. Qwen2; same per-group order)
    layers.i.self_attn.o_proj.weight        decoder.layers.i.self_attention.linear_proj.weight [E, H/t * D]
    layers.i.post_attention_layernorm       decoder.layers.i.pre_mlp_layernorm.weight
    layers.i.mlp.{gate,up}_proj.weight      decoder.layers.i.mlp.linear_fc1.weight [2F/t, E] = [gate_r ; up_r]
    layers.i.mlp.down_proj.weight           decoder.layers.i.mlp.linear_fc2.weight [E, F/t]
    model.norm.weight                       decoder.final_layernorm.weight
    lm_head.weight [V, E]                   output_layer.weight [Vp/t, E]   (absent when tied)

(V vocab, Vp padded vocab, E hidden, H query heads, G KV heads, hpg = H/G, D head dim,
F intermediate.) With the Transformer Engine layout the two per-layer norms are fused
into the following linears: `self_attention.linear_qkv.layer_norm_weight` and
`mlp.linear_fc1.layer_norm_weight`. Padded vocabulary rows are zero.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from megaseg.config import ModelConfig

DEFAULT_VOCAB_MULTIPLE = 128  # megatron-LM's make_vocab_size_divisible_by default

_EXTRA_STATE = "._extra_state"
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


class ConversionError(ValueError):
    """A state dict does not match the model config (missing, unexpected or mis-shaped weights)."""


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = DEFAULT_VOCAB_MULTIPLE) -> int:
    """Rows of megatron's embedding/output layer: vocab_size rounded up to multiple * tp_size."""
    if vocab_size <= 0 or tp_size <= 0 or multiple <= 0:
        raise ValueError(f"vocab_size={vocab_size}, tp_size={tp_size}, multiple={multiple} must all be > 0")
    step = multiple * tp_size
    return -(-vocab_size // step) * step


def _norm_names(te_layout: bool) -> tuple[str, str]:
    if te_layout:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def _check_tp(cfg: ModelConfig, tp_size: int, padded_vocab: int):
    for name, value in (("num_kv_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size),
                        ("padded vocab size", padded_vocab)):
        if value % tp_size:
            raise ConversionError(f"tp_size={tp_size} must divide {name}={value}")


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"missing weight {key!r}")
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"{key!r} has shape {tuple(t.shape)}, the model config needs {tuple(shape)}")
    return t


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy, so that a saved shard does not drag the whole tensor's storage."""
    return t.clone(memory_format=torch.contiguous_format)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], 0)


def reference_to_megatron(
    ref_state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    tp_rank: int,
    tp_size: int,
    *,
    te_layout: bool = False,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
) -> dict[str, torch.Tensor | None]:
    """State dict of megatron GPTModel TP rank ``tp_rank`` of ``tp_size`` (whole model, no PP split).

    ``ref_state_dict`` uses the reference model's (= HF Llama's) names; rotary
    ``inv_freq`` buffers are ignored, anything else unknown is an error. The result loads
    with ``model.load_state_dict(sd, strict=True)`` into `build_model(cfg)` on that rank
    (``te_layout=True`` for the Transformer Engine spec; ``vocab_multiple`` as given to
    build_model). Every tensor is a fresh copy.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, {tp_size})")
    E, V = cfg.hidden_size, cfg.vocab_size
    Vp = padded_vocab_size(V, tp_size, vocab_multiple)
    _check_tp(cfg, tp_size, Vp)
    known = {k for k in ref_state_dict if not k.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()

    def take(key, shape):
        used.add(key)
        return _take(ref_state_dict, key, shape)

    v_per = Vp // tp_size
    vocab_rows = slice(tp_rank * v_per, (tp_rank + 1) * v_per)
    out: dict[str, torch.Tensor | None] = {}
    embed = take("model.embed_tokens.weight", (V, E))
    out["embedding.word_embeddings.weight"] = _own(_pad_rows(embed, Vp)[vocab_rows])
    for i in range(cfg.num_layers):
        out.update(_layer_to_megatron(take, cfg, i, tp_rank, tp_size, te_layout))
    out["decoder.final_layernorm.weight"] = _own(take("model.norm.weight", (E,)))
    out.update(_output_layer_to_megatron(ref_state_dict, take, embed, cfg, Vp, vocab_rows))
    unexpected = sorted(known - used)
    if unexpected:
        more = " ..." if len(unexpected) > 8 else ""
        raise ConversionError(f"unexpected weights for this model config: {unexpected[:8]}{more}")
    return out


def _layer_to_megatron(take, cfg: ModelConfig, i: int, tp_rank: int, tp_size: int,
                       te_layout: bool) -> dict[str, torch.Tensor | None]:
    """Layer ``i``'s megatron weights on TP rank ``tp_rank``; ``take(key, shape)`` reads one
    shape-checked reference weight."""
    E, D, H, G, F = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    hpg = cfg.heads_per_group
    g_per, f_per = G // tp_size, F // tp_size
    groups = slice(tp_rank * g_per, (tp_rank + 1) * g_per)
    norm_in, norm_mlp = _norm_names(te_layout)
    src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
    out: dict[str, torch.Tensor | None] = {}
    out[dst + norm_in] = _own(take(src + "input_layernorm.weight", (E,)))
    q = take(src + "self_attn.q_proj.weight", (H * D, E)).reshape(G, hpg * D, E)
    k = take(src + "self_attn.k_proj.weight", (G * D, E)).reshape(G, D, E)
    v = take(src + "self_attn.v_proj.weight", (G * D, E)).reshape(G, D, E)
    qkv = torch.cat([q, k, v], 1)[groups]
    out[dst + "self_attention.linear_qkv.weight"] = _own(qkv.reshape(-1, E))
    if cfg.qkv_bias:
        qb = take(src + "self_attn.q_proj.bias", (H * D,)).reshape(G, hpg * D)
        kb = take(src + "self_attn.k_proj.bias", (G * D,)).reshape(G, D)
        vb = take(src + "self_attn.v_proj.bias", (G * D,)).reshape(G, D)
        out[dst + "self_attention.linear_qkv.bias"] = _own(torch.cat([qb, kb, vb], 1)[groups].reshape(-1))
    o = take(src + "self_attn.o_proj.weight", (E, H * D))
    cols = g_per * hpg * D
    out[dst + "self_attention.linear_proj.weight"] = _own(o[:, tp_rank * cols : (tp_rank + 1) * cols])
    out[dst + norm_mlp] = _own(take(src + "post_attention_layernorm.weight", (E,)))
    rows = slice(tp_rank * f_per, (tp_rank + 1) * f_per)
    gate = take(src + "mlp.gate_proj.weight", (F, E))[rows]
    up = take(src + "mlp.up_proj.weight", (F, E))[rows]
    out[dst + "mlp.linear_fc1.weight"] = _own(torch.cat([gate, up], 0))
    out[dst + "mlp.linear_fc2.weight"] = _own(take(src + "mlp.down_proj.weight", (E, F))[:, rows])
    for linear in _LINEARS:
        out[dst + linear + _EXTRA_STATE] = None
    return out


def _output_layer_to_megatron(ref_state_dict: Mapping[str, torch.Tensor], take, embed: torch.Tensor,
                              cfg: ModelConfig, Vp: int, vocab_rows: slice) -> dict[str, torch.Tensor | None]:
    """The output layer's entries (none but its extra state when tied, after checking that a
    given ``lm_head.weight`` equals ``embed``)."""
    V, E = cfg.vocab_size, cfg.hidden_size
    out: dict[str, torch.Tensor | None] = {}
    if cfg.tie_word_embeddings:
        if "lm_head.weight" in ref_state_dict:
            head = take("lm_head.weight", (V, E))
            if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
                raise ConversionError(
                    "tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight"
                )
    else:
        head = take("lm_head.weight", (V, E))
        out["output_layer.weight"] = _own(_pad_rows(head, Vp)[vocab_rows])
    out["output_layer" + _EXTRA_STATE] = None
    return out


def megatron_to_reference(
    tp_state_dicts: Sequence[Mapping[str, torch.Tensor | None]], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Reference (HF Llama-named) state dict from the state dicts of all TP ranks, in rank order.

    Works for parameters or for anything shaped like them (e.g. their gradients; with
    sequence parallelism, norm gradients only after `finalize_model_grads`, since
    replicated entries must agree across ranks). ``_extra_state`` entries are ignored; the local or Transformer Engine layout is
    detected from the names; padded vocabulary rows are dropped. With tied embeddings
    ``lm_head.weight`` is the same tensor as ``model.embed_tokens.weight``.
    """
    tp_size = len(tp_state_dicts)
    if tp_size == 0:
        raise ValueError("need the state dict of at least one tensor-parallel rank")
    E, V = cfg.hidden_size, cfg.vocab_size
    sds = [{k: v for k, v in sd.items() if not k.endswith(_EXTRA_STATE)} for sd in tp_state_dicts]
    te_layout = any(k.endswith("linear_qkv.layer_norm_weight") for k in sds[0])
    Vp = _megatron_padded_vocab(sds, cfg)
    _check_tp(cfg, tp_size, Vp)
    v_per = Vp // tp_size
    shards = _TPShards(sds)
    out: dict[str, torch.Tensor] = {}
    embed = torch.cat(list(shards.each("embedding.word_embeddings.weight", (v_per, E))), 0)[:V]
    out["model.embed_tokens.weight"] = _own(embed)
    for i in range(cfg.num_layers):
        out.update(_layer_to_reference(shards, cfg, i, tp_size, te_layout))
    out["model.norm.weight"] = shards.same("decoder.final_layernorm.weight", (E,))
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = _own(torch.cat(list(shards.each("output_layer.weight", (v_per, E))), 0)[:V])
    shards.check_all_used()
    return out


def _megatron_padded_vocab(sds: Sequence[Mapping[str, torch.Tensor]], cfg: ModelConfig) -> int:
    """Rows of the embedding over all TP ranks, read from rank 0's shard."""
    tp_size, V = len(sds), cfg.vocab_size
    emb0 = sds[0].get("embedding.word_embeddings.weight")
    if emb0 is None:
        raise ConversionError(
            "missing weight 'embedding.word_embeddings.weight' (a pipeline stage split is not supported)"
        )
    Vp = emb0.shape[0] * tp_size
    if Vp < V:
        raise ConversionError(f"embedding has {Vp} rows over {tp_size} ranks, fewer than vocab_size={V}")
    return Vp


class _TPShards:
    """Shape-checked reads of one weight from every TP rank's state dict, remembering which
    entries of each rank were read."""

    def __init__(self, sds: Sequence[Mapping[str, torch.Tensor]]):
        self.sds = sds
        self.used: list[set[str]] = [set() for _ in sds]

    def each(self, key: str, shape: tuple[int, ...]):
        """Every rank's ``key``, in rank order."""
        for r, sd in enumerate(self.sds):
            self.used[r].add(key)
            yield _take(sd, key, shape)

    def same(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A copy of a replicated ``key``, which must be equal on every rank."""
        parts = list(self.each(key, shape))
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise ConversionError(f"{key!r} is replicated over tensor-parallel ranks but differs between them")
        return _own(parts[0])

    def check_all_used(self) -> None:
        """Refuse entries no read asked for."""
        for r, sd in enumerate(self.sds):
            unexpected = sorted(set(sd) - self.used[r])
            if unexpected:
                raise ConversionError(f"rank {r}: unexpected weights for this model config: {unexpected[:8]}")


def _layer_to_reference(shards: _TPShards, cfg: ModelConfig, i: int, tp_size: int,
                        te_layout: bool) -> dict[str, torch.Tensor]:
    """Layer ``i``'s reference weights, gathered from every TP rank's shards."""
    E, D, H, G, F = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    hpg = cfg.heads_per_group
    g_per, f_per = G // tp_size, F // tp_size
    norm_in, norm_mlp = _norm_names(te_layout)
    src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    out[dst + "input_layernorm.weight"] = shards.same(src + norm_in, (E,))
    qkv = torch.cat([w.reshape(g_per, (hpg + 2) * D, E)
                     for w in shards.each(src + "self_attention.linear_qkv.weight", (g_per * (hpg + 2) * D, E))], 0)
    q, k, v = qkv.split([hpg * D, D, D], dim=1)
    out[dst + "self_attn.q_proj.weight"] = _own(q.reshape(H * D, E))
    out[dst + "self_attn.k_proj.weight"] = _own(k.reshape(G * D, E))
    out[dst + "self_attn.v_proj.weight"] = _own(v.reshape(G * D, E))
    if cfg.qkv_bias:
        qkv_b = torch.cat([b.reshape(g_per, (hpg + 2) * D)
                           for b in shards.each(src + "self_attention.linear_qkv.bias", (g_per * (hpg + 2) * D,))], 0)
        qb, kb, vb = qkv_b.split([hpg * D, D, D], dim=1)
        out[dst + "self_attn.q_proj.bias"] = _own(qb.reshape(H * D))
        out[dst + "self_attn.k_proj.bias"] = _own(kb.reshape(G * D))
        out[dst + "self_attn.v_proj.bias"] = _own(vb.reshape(G * D))
    out[dst + "self_attn.o_proj.weight"] = _own(
        torch.cat(list(shards.each(src + "self_attention.linear_proj.weight", (E, g_per * hpg * D))), 1)
    )
    out[dst + "post_attention_layernorm.weight"] = shards.same(src + norm_mlp, (E,))
    fc1 = [w.split(f_per, 0) for w in shards.each(src + "mlp.linear_fc1.weight", (2 * f_per, E))]
    out[dst + "mlp.gate_proj.weight"] = _own(torch.cat([gate for gate, _ in fc1], 0))
    out[dst + "mlp.up_proj.weight"] = _own(torch.cat([up for _, up in fc1], 0))
    out[dst + "mlp.down_proj.weight"] = _own(torch.cat(list(shards.each(src + "mlp.linear_fc2.weight", (E, f_per))), 1))
    return out
