"""Peak memory per rank of one training step, predicted from the model shape and the layout.

The companion of `megaseg.inference.memory_model` for training: weights, gradients and
optimizer state per rank (TP, PP, DP, distributed optimizer: fp32 weights and gradient
buffer, 4 + 4 bytes per parameter of the largest stage on one TP rank, and Adam's two fp32
moments, 8 bytes, divided by DP x CP with the distributed optimizer), plus the activations the
step engine keeps for the backward and the largest transient on top of them. The
activation terms are counted per token and layer from what the megatron-core layer with
megaseg's segmented attention saves for its backward (census: autograd's saved tensors,
unique storages, `tools/bench_recompute.py --census`):

* **rest of the layer** (kept unless the layer is recomputed): 7.75 E elements of hidden
  size (the layer input, the two norm outputs and residual sums), 3 F of the SwiGLU MLP
  (fc1's 2F output and the product) and the (H + 2G) D of the QKV projection. Under bf16
  autocast the residual stream and norms stay fp32: 4.9 E at 4 bytes, 2.85 E and the rest
  at 2.
* **core attention** (also dropped by selective ``core_attn`` recompute): the rotated
  queries and the output (2 H D) and, per KV group, rotated keys and values with the
  group's prefix in front: 2 D (S + P_g) / S per token (P_g = M for `local`, R for
  `retrieval`, 0 for `segment` groups). With the ``sdpa`` kernel also one additive mask of
  S x (S + P) elements per prefix length in the layer, shared by a chunk's segments (two
  on the rank that holds the sequence's first segment); the fused ``triton`` kernel
  saves no mask.
* **loss**: the log-softmax of the gathered logits, V fp32 per token; with full
  recompute in the context-parallel chunk path the output layer and loss are recomputed
  per segment and only the final hidden states stay.
* **full recompute** keeps (layers + 3) E per token (each layer's input, the final norm's
  and the loss's inputs; fp32; under bf16 the last two are not kept separately: layers + 1).

What is alive at the peak depends on the engine:

* ``sequential`` (TBPTT-K, one rank per sequence): K + 1 segment graphs (K retained for the
  pushes, the current one), each S x micro-batch tokens; with full recompute their layer
  inputs, plus one recomputed layer of one segment. The retrieval pools grow with the
  sequence: T tokens' retrieval-group keys and values, twice with recompute (the retained
  segment's checkpointed functions hold the previous generation).
* ``chunk`` (context parallelism; also ``tbptt_k = -1``): the graph of the rank's whole
  chunk, T / CP tokens; with full recompute the layer inputs of the chunk plus one
  recomputed layer over the chunk.

The transient on top (the backward's gradients of activations, the logits and their
gradient) is modelled as ``TRANSIENT_LOGITS`` x the tokens' logits at the start of the
backward (the logits, their copy and their gradient), or, when a layer is recomputed,
``TRANSIENT_LAYER`` x that layer's saved set (its gradients). `tools/bench_recompute.py`
prints the model beside every measured point (`docs/benchmarks/recompute.json`). Pipeline stages hold
L / PP layers and, as megatron's 1F1B schedule does, the first stage keeps min(PP,
micro-batches) micro-batches in flight; that part and TP's division of the F, H and G
terms are taken from megatron's layer layout and are not measured here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megaseg.config import LOCAL, RETRIEVAL, ModelConfig
from megaseg.inference.memory_model import parameter_count

TRANSIENT_LOGITS = 3.0  # logits, their copy and gradient: x (tokens x V x 4 bytes)
TRANSIENT_LAYER = 1.0  # gradients of a recomputed layer's activations: x its saved set
RECOMPUTE = ("none", "selective", "full")
KERNELS = ("sdpa", "triton")


@dataclass(frozen=True)
class TrainingLayout:
    """What decides a training step's memory besides the model shape."""

    seq_length: int
    tbptt_k: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective (core_attn) | full
    bf16: bool = False  # autocast over fp32 weights (--bf16)
    kernel: str = "sdpa"  # sdpa | triton
    step_engine: str = "auto"  # auto (as the trainer picks) | sequential | chunk

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is invalid: one of {RECOMPUTE}")
        if self.step_engine not in ("auto", "sequential", "chunk"):
            raise ValueError(f"step_engine={self.step_engine!r} is invalid: auto, sequential or chunk")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is invalid: one of {KERNELS}")
        for name in ("seq_length", "micro_batch_size", "num_microbatches", "tp", "pp", "cp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def engine(self) -> str:
        if self.step_engine != "auto":
            return self.step_engine
        return "chunk" if self.cp > 1 or self.tbptt_k < 0 else "sequential"


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    """Bytes per rank at a step's peak; ``total`` is their sum."""

    weights: int
    grads: int
    optimizer: int
    activations: int  # saved for the backward at the peak
    transient: int  # on top of them at the peak

    @property
    def model_state(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + self.activations + self.transient

    def as_dict(self) -> dict:
        return {**asdict(self), "model_state": self.model_state, "total": self.total}


def stage_parameters(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> int:
    """Parameters of the largest pipeline stage on one TP rank (its layers plus the
    embedding or the output layer)."""
    if pp == 1:
        return parameter_count(cfg) // tp
    total = parameter_count(cfg)
    E, V = cfg.hidden_size, cfg.vocab_size
    per_layer = (total - V * E * (1 if cfg.tie_word_embeddings else 2) - E) // cfg.num_layers
    return (-(-cfg.num_layers // pp) * per_layer + V * E) // tp


def _rest_bytes(cfg: ModelConfig, tp: int, bf16: bool) -> float:
    """Per token: one layer's saved tensors outside core attention."""
    E, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    other = 3 * F / tp + (cfg.num_heads + 2 * cfg.num_kv_heads) * D / tp
    return 4 * 4.9 * E + 2 * 2.85 * E + 2 * other if bf16 else 4 * (7.75 * E + other)


def _core_bytes(cfg: ModelConfig, layer: int, tp: int, b: int) -> float:
    """Per token: one layer's saved core-attention tensors."""
    S, D = cfg.segment.segment_length, cfg.head_dim
    prefix = {LOCAL: cfg.segment.tail_length, RETRIEVAL: cfg.segment.retrieval_length}
    groups = sum(2 * D * (S + prefix.get(m, 0)) / S for m in cfg.head_plan.layer(layer))
    return b * (2 * cfg.num_heads * D + groups) / tp


def _mask_bytes(cfg: ModelConfig, layer: int, b: int, runs: int) -> int:
    """The sdpa kernel's saved additive masks of one layer: one S x (S + P) per prefix length."""
    S = cfg.segment.segment_length
    prefix = {LOCAL: cfg.segment.tail_length, RETRIEVAL: cfg.segment.retrieval_length}
    lengths = {prefix.get(m, 0) for m in cfg.head_plan.layer(layer)} - {0}
    return runs * sum(S * (S + P) * b for P in lengths)


def activation_bytes_per_token(cfg: ModelConfig, layout: TrainingLayout, layers: range | None = None) -> dict:
    """Per token and summed over ``layers``: {"rest", "core", "loss", "inputs"} bytes (the
    census terms of the module docstring)."""
    b = 2 if layout.bf16 else 4
    layers = layers if layers is not None else range(cfg.num_layers)
    E = cfg.hidden_size
    return {
        "rest": len(layers) * _rest_bytes(cfg, layout.tp, layout.bf16),
        "core": sum(_core_bytes(cfg, i, layout.tp, b) for i in layers),
        "loss": 4 * cfg.vocab_size,
        "inputs": 4 * (len(layers) + (1 if layout.bf16 else 3)) * E + 20,
    }


def _layer_saved(cfg, layout, layer: int, tokens: int, runs: int) -> float:
    b = 2 if layout.bf16 else 4
    saved = tokens * (_rest_bytes(cfg, layout.tp, layout.bf16) + _core_bytes(cfg, layer, layout.tp, b))
    if layout.kernel == "sdpa":
        saved += _mask_bytes(cfg, layer, b, runs) / layout.tp
    return saved


def _graph_bytes(cfg, layout, layers: range, tokens: int, runs: int, with_loss: bool) -> tuple[float, float]:
    """(saved, transient) of one forward's graph over ``tokens`` tokens."""
    b = 2 if layout.bf16 else 4
    per = activation_bytes_per_token(cfg, layout, layers)
    loss_tokens = tokens if with_loss else 0
    logits = loss_tokens * 4 * cfg.vocab_size
    if layout.recompute == "full":
        S = cfg.segment.segment_length
        saved = tokens * per["inputs"]
        worst = max(_layer_saved(cfg, layout, i, tokens, runs) for i in layers)
        transient = (1 + TRANSIENT_LAYER) * worst
        if layout.engine == "chunk":  # output layer and loss recomputed one segment at a time
            transient = max(transient, TRANSIENT_LOGITS * min(S * layout.micro_batch_size, loss_tokens) * 4
                            * cfg.vocab_size)
        else:
            saved += logits
            transient = max(transient, TRANSIENT_LOGITS * logits)
        return saved, transient
    saved = sum(_layer_saved(cfg, layout, i, tokens, runs) for i in layers) + logits
    if layout.recompute == "selective":
        core = sum(tokens * _core_bytes(cfg, i, layout.tp, b) for i in layers)
        masks = sum(_mask_bytes(cfg, i, b, runs) for i in layers) / layout.tp if layout.kernel == "sdpa" else 0
        saved -= core + masks
        worst = max(tokens * _core_bytes(cfg, i, layout.tp, b) for i in layers)
        return saved, max(TRANSIENT_LOGITS * logits, (1 + TRANSIENT_LAYER) * worst)
    return saved, TRANSIENT_LOGITS * logits


def _pool_bytes(cfg: ModelConfig, layout: TrainingLayout, layers: range) -> int:
    """The sequential engine's retrieval pools (detached keys and values of every closed
    token, retrieval groups only) near the end of the sequence: the current one, and with
    recompute also the previous generation, which the retained segment's checkpointed
    functions hold through their inputs (the state they re-run from)."""
    b = 2 if layout.bf16 else 4
    groups = sum(cfg.head_plan.layer(i).count(RETRIEVAL) for i in layers)
    generations = 1 if layout.recompute == "none" else 2
    return generations * layout.seq_length * layout.micro_batch_size * groups * 2 * cfg.head_dim * b // layout.tp


def predict_training_memory(cfg: ModelConfig, layout: TrainingLayout) -> TrainingMemoryEstimate:
    """Predicted peak bytes per rank of one training step of ``cfg`` (its S, M, R and head
    plan) laid out as ``layout`` (the largest pipeline stage, the first CP rank)."""
    S = cfg.segment.segment_length
    phi = stage_parameters(cfg, layout.tp, layout.pp)
    weights, grads = 4 * phi, 4 * phi
    # megatron-core's distributed optimizer shards over the data-parallel ranks including the
    # context-parallel ones (they hold the same weights)
    optimizer = 8 * phi // (layout.dp * layout.cp if layout.distributed_optimizer else 1)
    per_stage = -(-cfg.num_layers // layout.pp)
    layers = range(per_stage)
    in_flight = min(layout.pp, layout.num_microbatches)
    B = layout.micro_batch_size
    with_loss = layout.pp == 1
    if layout.engine == "chunk":
        tokens = -(-layout.seq_length // layout.cp) * B
        runs = 2 if layout.seq_length > S else 1
        saved, transient = _graph_bytes(cfg, layout, layers, tokens, runs, with_loss)
    else:
        graphs = min(layout.tbptt_k + 1, -(-layout.seq_length // S))
        one, transient = _graph_bytes(cfg, layout, layers, min(S, layout.seq_length) * B, 1, with_loss)
        saved = graphs * one + _pool_bytes(cfg, layout, layers)
    return TrainingMemoryEstimate(weights=int(weights), grads=int(grads), optimizer=int(optimizer),
                                  activations=int(saved * in_flight), transient=int(transient))
