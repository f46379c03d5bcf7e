"""Pretraining arguments: Megatron-style flags, an optional YAML file, one validated dataclass.

Precedence: `PretrainConfig` defaults < YAML file (``--config``/``--yaml-cfg``) < flags
given on the command line. Every field is both a flag and a YAML key:
``num_layers: 4`` in YAML is ``--num-layers 4`` on the command line (YAML keys may use
either ``_`` or ``-``). The defaults are the embedded default run: a small model on the
default dataset that trains on two CPU cores in a few minutes.

A bad value raises `ConfigError` naming the field, the value and what is allowed, before
any work starts; `parse_args` never prints a traceback for user mistakes.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.segment_options import SEGMENT_OPTIONS, OneLineArgumentParser, flag, head_plan_from

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
OPTIMIZERS = ("adam", "sgd")


def _f(default, help: str, group: str, choices: Sequence[str] | None = None, **kw):
    """A field with its flag's help text, argument group and allowed values."""
    meta = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _seg(name: str, default):
    """A segment-setting field: help and choices come from `SEGMENT_OPTIONS`, which the tools share."""
    opt = SEGMENT_OPTIONS[name]
    return _f(default, opt.help, "segment", opt.choices)


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs; validated in ``__post_init__``."""

    # ---- model ------------------------------------------------------------------------
    num_layers: int = _f(4, "transformer layers", "model")
    hidden_size: int = _f(256, "hidden size", "model")
    ffn_hidden_size: int | None = _f(None, "MLP hidden size (default: 8/3 * hidden, rounded up to 64)", "model")
    num_attention_heads: int = _f(4, "query heads", "model")
    num_query_groups: int | None = _f(None, "KV heads for grouped-query attention (default: num_attention_heads)", "model")
    kv_channels: int | None = _f(None, "head dim (default: hidden_size / num_attention_heads)", "model")
    norm_epsilon: float = _f(1e-5, "RMSNorm epsilon", "model")
    rotary_base: float = _f(10000.0, "RoPE theta", "model")
    rope_scaling_type: str | None = _f(None, "RoPE frequency scaling (default: none)", "model", ("linear", "llama3"))
    rope_scaling_factor: float = _f(1.0, "RoPE scaling factor (linear, llama3)", "model")
    rope_low_freq_factor: float = _f(1.0, "llama3 RoPE scaling: low-frequency factor", "model")
    rope_high_freq_factor: float = _f(4.0, "llama3 RoPE scaling: high-frequency factor", "model")
    rope_original_max_position_embeddings: int = _f(8192, "llama3 RoPE scaling: original context length", "model")
    untie_embeddings_and_output_weights: bool = _f(True, "separate output layer weights (Llama layout)", "model")
    add_qkv_bias: bool = _f(False, "biases on the query/key/value projections (Qwen2 layout)", "model")
    init_method_std: float = _f(0.02, "std of the normal weight init", "model")
    vocab_size: int | None = _f(None, "vocabulary size (default: the tokenizer's)", "model")

    # ---- segmented execution (docs/semantics.md; flags shared with the tools) --------------
    segment_length: int = _seg("segment_length", 512)
    tail_length: int = _seg("tail_length", 64)
    retrieval_length: int = _seg("retrieval_length", 64)
    tbptt_k: int = _seg("tbptt_k", 1)
    retrieval_group_reduce: str = _seg("retrieval_group_reduce", "sum")
    head_plan_preset: str = _seg("head_plan_preset", "interleaved")
    long_range_layers: list[int] = _seg("long_range_layers", [1, 3])
    num_long_range_heads: int = _seg("num_long_range_heads", 1)
    long_range_heads: list[int] = _seg("long_range_heads", [])
    head_plan_file: str | None = _seg("head_plan_file", None)

    # ---- training ------------------------------------------------------------------------
    seq_length: int = _f(2048, "tokens per training sequence", "training")
    micro_batch_size: int = _f(2, "sequences per forward/backward", "training")
    global_batch_size: int = _f(4, "sequences per optimizer step (all data-parallel ranks)", "training")
    train_iters: int = _f(100, "optimizer steps to train for", "training")
    lr: float = _f(3e-3, "peak learning rate", "training")
    min_lr: float = _f(3e-4, "learning rate at the end of decay", "training")
    lr_decay_style: str = _f("cosine", "learning rate decay after warmup", "training", LR_DECAY_STYLES)
    lr_warmup_iters: int | None = _f(None, "linear warmup steps from lr_warmup_init to lr (overrides the fraction)", "training")
    lr_warmup_fraction: float = _f(0.1, "warmup steps as a fraction of lr_decay_iters", "training")
    lr_warmup_init: float = _f(0.0, "learning rate at step 0", "training")
    lr_decay_iters: int | None = _f(None, "decay length in steps (default: train_iters)", "training")
    weight_decay: float = _f(0.1, "AdamW weight decay", "training")
    optimizer: str = _f("adam", "optimizer", "training", OPTIMIZERS)
    adam_beta1: float = _f(0.9, "Adam beta1", "training")
    adam_beta2: float = _f(0.95, "Adam beta2", "training")
    adam_eps: float = _f(1e-8, "Adam epsilon", "training")
    sgd_momentum: float = _f(0.9, "SGD momentum", "training")
    clip_grad: float = _f(1.0, "clip the global grad norm to this (0 = off)", "training")
    bf16: bool | None = _f(None, "bf16 autocast (default: on where the hardware supports it, CUDA only)", "training")
    seed: int = _f(1234, "random seed", "training")
    freeze_retrieval_qk: bool = _f(
        False, "keep the query and key projections of every retrieval KV group at the values the run starts "
        "from (the pretrained weights): the retrieval selection scores stay the base model's while everything "
        "else trains (retrieval is forward-only, so nothing trains the selection itself)", "training")
    freeze_params: list[str] = _f(
        [], "parameters kept at the values the run starts from: shell-style patterns over megatron-core parameter "
        "names with global layer numbers, e.g. 'embedding.*' 'decoder.layers.0.*' "
        "'decoder.layers.1.input_layernorm.*'", "training")
    max_consecutive_skipped_steps: int = _f(
        5, "a step with a non-finite loss or grad norm is skipped (no update); stop after this many in a row "
        "(0 = stop at the first)", "training")

    # ---- parallelism -----------------------------------------------------------------------
    tensor_model_parallel_size: int = _f(1, "tensor-parallel ranks", "parallel")
    pipeline_model_parallel_size: int = _f(
        1, "pipeline stages (must divide num_layers); TBPTT-K then runs one segment's loss per pipeline "
        "micro-batch (docs/parallelism.md)", "parallel")
    context_parallel_size: int = _f(1, "context-parallel ranks: each runs a contiguous chunk of whole segments of "
                                    "every sequence (megaseg's segment-chunk context parallelism)", "parallel")
    use_distributed_optimizer: bool = _f(
        False, "shard fp32 main params and Adam state over data-parallel ranks (megatron-core DistributedOptimizer, "
        "ZeRO-1: grads are reduce-scattered, params all-gathered after the step)", "parallel")
    deepspeed: bool = _f(False, "DeepSpeed ZeRO stage 1/2 instead of megatron's optimizer (pip install "
                         "'megaseg[deepspeed]')", "parallel")
    deepspeed_config: str | None = _f(None, "DeepSpeed JSON config (zero_optimization.stage 1 or 2, optional "
                                      "offload_optimizer); batch sizes and clipping must agree with the flags", "parallel")
    use_te: bool | None = _f(None, "Transformer Engine layers (default: when importable)", "parallel")
    recompute_granularity: str | None = _f(
        None, "activation recompute (megatron's flag): full = keep only the inputs of each group of layers and "
        "re-run them in the backward; selective = re-run only --recompute-modules. The carried tails keep their "
        "gradient (TBPTT-K stays exact)", "parallel", ("full", "selective"))
    recompute_method: str | None = _f(
        None, "with full recompute: uniform = checkpoint every group of --recompute-num-layers layers; block = "
        "checkpoint only the first --recompute-num-layers layers of each stage (default: uniform)", "parallel",
        ("uniform", "block"))
    recompute_num_layers: int | None = _f(None, "layers per checkpointed group (uniform) or checkpointed layers per "
                                          "stage (block); default 1", "parallel")
    recompute_modules: list[str] = _f([], "with selective recompute: core_attn and/or mlp (default: core_attn)",
                                      "parallel")
    attention_kernel: str = _f(
        "auto", "segmented attention kernel: auto = fused Triton kernel on CUDA when triton imports, else the "
        "SDPA reference (not part of the model config)", "parallel", ("auto", "sdpa", "triton"),
    )

    # ---- data -------------------------------------------------------------------------------
    data_path: list[str] = _f([], "megatron blend: prefix ... or weight prefix ... (default: the default dataset)", "data")
    loss_mask_data_path: list[str] = _f(
        [], "per --data-path prefix (same order), an indexed dataset of the same documents holding 1 where a token "
        "is trained on: the loss counts only there (e.g. the answers of tools/make_recall_data.py "
        "--loss-mask-output)", "data")
    default_data_dir: str = _f("data/default", "where the default dataset is prepared when no data_path is given", "data")
    split: str = _f("98,2,0", "train,valid,test split of the data", "data")
    reset_attention_mask: bool = _f(
        False, "documents are the unit of state: after an EOD the next token starts a fresh segment grid (no carried "
        "tail, an empty retrieval pool, positions from 0), so a packed document trains as if alone", "data")
    reset_position_ids: bool = _f(False, "positions restart after an EOD; under segmented execution this is "
                                  "--reset-attention-mask (both restart together)", "data")
    eod_mask_loss: bool = _f(False, "no loss on predicting the token after an EOD", "data")
    tokenizer_model: str | None = _f(
        None, "sentencepiece .model file, or a Hugging Face tokenizer (a directory with tokenizer.json, or the file) "
        "(default: the pretrained checkpoint's, else the default dataset's)", "data")
    tokenizer_type: str | None = _f(None, "tokenizer kind (default: what --tokenizer-model holds)", "data",
                                    ("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    data_cache_path: str | None = _f(None, "where dataset index caches go (default: PREFIX/cache/ of each dataset); "
                                     "an index older than its dataset is rebuilt", "data")

    # ---- checkpointing ----------------------------------------------------------------------
    save: str | None = _f("runs/default/checkpoints", "checkpoint directory to save to ('none' = never)", "checkpointing")
    save_interval: int | None = _f(50, "save every N steps (and at the end)", "checkpointing")
    load: str | None = _f(None, "checkpoint directory (or one iter_* folder) to resume from", "checkpointing")
    no_load_optim: bool = _f(False, "fresh optimizer state (weights, data position and LR schedule still resume)", "checkpointing")
    no_load_rng: bool = _f(False, "do not restore RNG states", "checkpointing")
    override_opt_param_scheduler: bool = _f(
        False, "on resume, this run's LR schedule flags replace the checkpoint's (default: the checkpoint's win)",
        "checkpointing")
    pretrained_checkpoint: str | None = _f(
        None, "initialise the model from a Hugging Face Llama directory, a megaseg model directory or a pretraining "
        "checkpoint (fresh optimizer and schedule; the architecture and tokenizer come from it; --load wins once "
        "this run has saved)", "checkpointing")
    distributed_timeout_minutes: float = _f(
        10.0, "a collective or point-to-point exchange waiting longer than this fails the run (a hung or lost "
        "rank) instead of hanging it", "parallel")
    keep_last_n: int = _f(0, "keep only the newest N checkpoints in --save (0 = all); the one this run resumed "
                          "from is never deleted", "checkpointing")
    async_save: bool = _f(
        False, "write checkpoints in a background process (megatron-core dist_checkpointing's async save, "
        "Megatron's --async-save): training goes on while the files are written; the checkpoint is renamed into "
        "place and becomes the one to resume only once every rank's files are complete", "checkpointing")
    overwrite_checkpoints: bool = _f(
        False, "start from scratch even though --save holds checkpoints (they are removed once this run's first "
        "checkpoint is complete); without it, --save holding another run's checkpoints is an error and this run's "
        "own are resumed", "checkpointing")
    exit_signal_handler: bool = _f(True, "on SIGTERM/SIGUSR1 save at the next step boundary and exit 0", "checkpointing")
    exit_interval: int | None = _f(None, "save and exit after the iteration that is a multiple of this", "checkpointing")
    exit_duration_in_mins: float | None = _f(None, "save and exit once the run has lasted this long", "checkpointing")

    # ---- logging and validation ---------------------------------------------------------
    log_interval: int = _f(5, "print a log line every N steps", "logging")
    tensorboard_dir: str | None = _f("runs/default/tensorboard", "TensorBoard event files ('none' = off)", "logging")
    eval_interval: int = _f(25, "validation every N steps (and at the end)", "logging")
    eval_iters: int = _f(2, "global batches per validation (0 = no validation)", "logging")
    log_segment_stats_interval: int = _f(
        25, "every N steps write retrieval, attention-mass and tail-gradient statistics of one micro-batch to "
        "TensorBoard under segments/ (0 = never)", "logging")

    config: str | None = _f(None, "YAML file with any of these fields", "config")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _hints()[f.name], f.metadata.get("choices")))
        self._check()
        self._check_recompute()
        if self.loss_mask_data_path and not self.data_path:
            _fail("loss_mask_data_path", self.loss_mask_data_path, "needs --data-path (one mask per data prefix)")

    def _check_recompute(self):
        """Recompute flags are megatron's; a combination megatron would not run is one line."""
        modules = {"core_attn", "mlp"}
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    _fail(name, getattr(self, name), "needs --recompute-granularity full")
        if self.recompute_granularity != "selective" and self.recompute_modules:
            _fail("recompute_modules", self.recompute_modules, "needs --recompute-granularity selective")
        if "layernorm" in self.recompute_modules:
            _fail("recompute_modules", self.recompute_modules,
                  "cannot include layernorm: megatron's layernorm recompute (CheckpointWithoutOutput) frees its "
                  "state after one backward, which TBPTT-K repeats, and its gradient differs from the exact one "
                  "under segmented attention even at tbptt_k=0 (tested); use core_attn and/or mlp, or full")
        if set(self.recompute_modules) - modules:
            _fail("recompute_modules", self.recompute_modules, f"must be of {sorted(modules)} (a dense model)")
        if self.recompute_num_layers is not None and self.recompute_num_layers <= 0:
            _fail("recompute_num_layers", self.recompute_num_layers, "must be > 0")


    def recompute_overrides(self) -> dict:
        """megatron TransformerConfig fields of the recompute flags (megaseg.megatron.recompute
        runs them with the carried tails' gradient)."""
        if self.recompute_granularity == "full":
            return {"recompute_granularity": "full", "recompute_method": self.recompute_method or "uniform",
                    "recompute_num_layers": self.recompute_num_layers or 1}
        if self.recompute_granularity == "selective":
            return {"recompute_granularity": "selective", "recompute_modules": self.recompute_modules or ["core_attn"]}
        return {}

    # ------------------------------------------------------------------------------------
    def _check(self):
        positive = (
            "num_layers", "hidden_size", "num_attention_heads", "segment_length", "seq_length",
            "micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_interval",
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be > 0")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "vocab_size", "save_interval", "lr_decay_iters",
                     "exit_interval", "exit_duration_in_mins"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                _fail(name, v, "must be > 0 (or unset for the default)")
        for name in ("lr", "min_lr", "lr_warmup_init", "weight_decay", "clip_grad", "adam_eps", "init_method_std"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                _fail(name, v, "must be a finite number >= 0")
        for name in ("norm_epsilon", "rotary_base"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0")
        for name in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be in [0, 1)")
        if self.lr == 0:
            _fail("lr", self.lr, "must be > 0")
        if self.min_lr > self.lr:
            _fail("min_lr", self.min_lr, f"must be <= lr ({self.lr})")
        if self.lr_warmup_init > self.lr:
            _fail("lr_warmup_init", self.lr_warmup_init, f"must be <= lr ({self.lr})")
        if self.lr_warmup_iters is not None and self.lr_warmup_iters < 0:
            _fail("lr_warmup_iters", self.lr_warmup_iters, "must be >= 0")
        if self.lr_warmup_iters is not None and self.lr_warmup_iters >= self.decay_iters:
            _fail("lr_warmup_iters", self.lr_warmup_iters, f"must be < lr_decay_iters ({self.decay_iters})")
        if not 0 <= self.lr_warmup_fraction < 1:
            _fail("lr_warmup_fraction", self.lr_warmup_fraction, "must be in [0, 1)")
        if self.global_batch_size % self.micro_batch_size:
            _fail("global_batch_size", self.global_batch_size,
                  f"must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if self.eval_iters < 0:
            _fail("eval_iters", self.eval_iters, "must be >= 0")
        if not self.distributed_timeout_minutes > 0:
            _fail("distributed_timeout_minutes", self.distributed_timeout_minutes, "must be > 0")
        if self.reset_attention_mask and self.deepspeed:
            _fail("reset_attention_mask", True, "is not supported with deepspeed=True yet (untested there); use "
                  "megatron's optimizer (--use-distributed-optimizer for ZeRO-1)")
        for name in ("freeze_params", "freeze_retrieval_qk"):
            if getattr(self, name) and self.deepspeed:
                _fail(name, getattr(self, name), "is not supported with deepspeed=True: DeepSpeed owns the gradients "
                      "and the update; use megatron's optimizer (--use-distributed-optimizer for ZeRO-1)")
        if self.keep_last_n < 0:
            _fail("keep_last_n", self.keep_last_n, "must be >= 0 (0 = keep every checkpoint)")
        if self.reset_position_ids != self.reset_attention_mask:
            _fail("reset_position_ids", self.reset_position_ids,
                  f"must equal reset_attention_mask ({self.reset_attention_mask}): a document restarts its segment "
                  "state and its positions together; pass both --reset-position-ids and --reset-attention-mask")
        if self.log_segment_stats_interval < 0:
            _fail("log_segment_stats_interval", self.log_segment_stats_interval, "must be >= 0 (0 = never)")
        if self.max_consecutive_skipped_steps < 0:
            _fail("max_consecutive_skipped_steps", self.max_consecutive_skipped_steps, "must be >= 0")
        if self.context_parallel_size > 1:
            from megaseg.parallel.context import ChunkLayout

            ChunkLayout(self.seq_length, self.segment_length, self.context_parallel_size)
            if self.pipeline_model_parallel_size > 1:
                _fail("context_parallel_size", self.context_parallel_size,
                      f"must be 1 with pipeline_model_parallel_size={self.pipeline_model_parallel_size}: "
                      "context parallelism runs the whole model on each rank")
            if self.deepspeed:
                _fail("context_parallel_size", self.context_parallel_size,
                      "must be 1 with deepspeed=True: the DeepSpeed path reduces gradients over data-parallel ranks "
                      "only; use --use-distributed-optimizer")
        if self.tbptt_k < 0 and self.pipeline_model_parallel_size > 1:
            _fail("tbptt_k", self.tbptt_k, "must be >= 0 with pipeline parallelism")
        if self.num_layers % self.pipeline_model_parallel_size:
            _fail("pipeline_model_parallel_size", self.pipeline_model_parallel_size,
                  f"must divide num_layers ({self.num_layers}): every stage holds the same number of layers")
        if self.pipeline_model_parallel_size > 1 and self.deepspeed:
            _fail("pipeline_model_parallel_size", self.pipeline_model_parallel_size,
                  "must be 1 with deepspeed=True: DeepSpeed ZeRO runs the whole model on one stage; use "
                  "megatron's optimizer (--use-distributed-optimizer for ZeRO-1)")
        if self.head_plan_preset == "prior" and not self.long_range_heads and not self.head_plan_file:
            _fail("long_range_heads", self.long_range_heads, "the `prior` preset needs an explicit list of KV groups")
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0 or weights[1] < 0:
            _fail("split", self.split, "must be three comma-separated non-negative weights train,valid,test with train > 0")
        if self.eval_iters and weights[1] == 0:
            _fail("split", self.split, "has no validation share; give it one or set eval_iters=0")
        try:  # the model/segment fields must form a valid model (with --pretrained-checkpoint the
            # architecture is the checkpoint's: checked once pretrain_gpt.apply_pretrained has read it)
            if not self.pretrained_checkpoint:
                self.model_config(self.vocab_size or 32)
        except ConfigError as exc:
            name, _, rest = str(exc).partition("=")
            raise ConfigError(f"{_MODEL_FIELD_TO_FLAG.get(name, name)}={rest}") from None

    # ------------------------------------------------------------------------------------
    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return int(self.lr_warmup_fraction * self.decay_iters)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def head_plan(self) -> HeadPlan:
        groups = self.num_query_groups or self.num_attention_heads
        return head_plan_from(self.head_plan_preset, self.num_layers, groups, self.long_range_layers,
                              self.num_long_range_heads, self.long_range_heads or None, self.head_plan_file)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The `ModelConfig` these flags describe, for a tokenizer with ``vocab_size`` tokens."""
        return ModelConfig(
            vocab_size=self.vocab_size or vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_size,
            num_layers=self.num_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_query_groups or self.num_attention_heads,
            head_dim=self.kv_channels,
            rms_norm_eps=self.norm_epsilon,
            tie_word_embeddings=not self.untie_embeddings_and_output_weights,
            qkv_bias=self.add_qkv_bias,
            rope=RopeConfig(
                theta=self.rotary_base, scaling_type=self.rope_scaling_type, factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings),
            segment=SegmentConfig(self.segment_length, self.tail_length, self.retrieval_length, self.tbptt_k,
                                  self.retrieval_group_reduce),
            head_plan=self.head_plan(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ModelConfig/HeadPlan field names -> the PretrainConfig field (flag) that sets them.
_MODEL_FIELD_TO_FLAG = {
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_query_groups",
    "num_kv_groups": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "head_dim": "kv_channels",
    "rms_norm_eps": "norm_epsilon",
    "rope.theta": "rotary_base",
    "rope.scaling_type": "rope_scaling_type",
    "rope.factor": "rope_scaling_factor",
    "rope.high_freq_factor": "rope_high_freq_factor",
}


def _fail(name: str, value, allowed: str):
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(PretrainConfig))
    return _HINTS


def _base_type(hint):
    """(python type, optional?, is_list) of a field annotation."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _coerce_one(name, value, typ):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        _fail(name, value, "must be true or false")
    if typ is int:
        if isinstance(value, bool):
            _fail(name, value, "must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(name, value, "must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(name, value, "must be a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(name, value, "must be a string")
    raise TypeError(f"unsupported field type {typ} for {name}")


def _coerce(name, value, hint, choices):
    typ, optional, is_list = _base_type(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        _fail(name, value, "must be set")
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(name, value, f"must be a list of {typ.__name__}")
        return [_coerce_one(name, v, typ) for v in value]
    value = _coerce_one(name, value, typ)
    if choices and value not in choices:
        _fail(name, value, f"allowed: {', '.join(choices)}")
    return value


# ---- command line and YAML ------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Megatron-style flags for every `PretrainConfig` field; unset flags stay absent."""
    parser = OneLineArgumentParser(
        prog=prog,
        description="Pretrain a megaseg GPT (megatron-core) with segmented attention and TBPTT-K.",
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(PretrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        typ, optional, is_list = _base_type(_hints()[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta["help"] if "(default" in meta["help"] else f"{meta['help']} (default: {default})"
        names = [flag(f.name)]
        if f.name == "config":
            names.append("--yaml-cfg")
        if typ is bool and f.name.startswith("no_"):
            group.add_argument(*names, dest=f.name, action="store_const", const=True, help=help_text)
        elif typ is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            group.add_argument(*names, dest=f.name, nargs="*", type=str, help=help_text, metavar=typ.__name__.upper())
        elif meta["choices"]:
            group.add_argument(*names, dest=f.name, type=str, choices=meta["choices"], help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=str, help=help_text, metavar=typ.__name__.upper())
    return parser


def _normalize_key(key) -> str:
    return str(key).replace("-", "_")


def load_yaml(path: str) -> dict[str, Any]:
    """Flat mapping of field -> value from a YAML file; errors name the file and the key."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r} is invalid: no such file")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of flag names to values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(PretrainConfig)} - {"config"}
    out = {}
    for key, value in data.items():
        name = _normalize_key(key)
        if name in UNSUPPORTED:
            raise ConfigError(f"{path}: {name}={value!r} is invalid: {UNSUPPORTED[name]}")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        out[name] = value
    return out


# Megatron flags megaseg does not offer, and why (one-line ConfigError instead of "unrecognized").
UNSUPPORTED = {
    "num_layers_per_virtual_pipeline_stage": "megaseg runs no virtual (interleaved) pipeline stages; use "
    "--pipeline-model-parallel-size alone",
    "virtual_pipeline_model_parallel_size": "megaseg runs no virtual (interleaved) pipeline stages; use "
    "--pipeline-model-parallel-size alone",
}


def _refuse_unsupported(argv: Sequence[str]) -> None:
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        key = _normalize_key(name.lstrip("-")) if arg.startswith("--") else None
        if key in UNSUPPORTED:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            raise ConfigError(f"{key}={value!r} is invalid: {UNSUPPORTED[key]}")


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> PretrainConfig:
    """Flags (and the YAML file they name) -> a validated `PretrainConfig`.

    Raises `ConfigError` (one line, names the field; prefixed with the YAML file for its
    keys) for bad values; argparse exits with status 2 for malformed flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_unsupported(argv)
    parser = build_parser(prog)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    path = given.get("config")
    from_yaml = load_yaml(path) if path else {}
    values.update(from_yaml)
    values.update(given)
    try:
        return PretrainConfig(**values)
    except ConfigError as exc:
        name = str(exc).split("=", 1)[0]
        if name in from_yaml and name not in given:
            raise ConfigError(f"{path}: {exc}") from None
        raise
