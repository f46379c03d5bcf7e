"""The pretraining loop: megatron-core GPTModel + DDP + optimizer, driven by the TBPTT-K engine.

One optimizer step (`train_step`):

    zero the DDP grad buffers
    for each micro-batch of this rank's share of the global batch:
        tbptt_backward(segment_forward(model, ...), tokens, S, K)   # forward + exact L_K backward
    finalize_model_grads          # data-parallel all-reduce (megatron-core)
    optimizer.step()              # clips the global grad norm, AdamW
    scheduler.step(global_batch)  # linear warmup, then cosine (or linear/constant) decay

With pipeline stages (`--pipeline-model-parallel-size` > 1) the forward/backward runs on
megatron's 1F1B schedule instead, one segment's loss per pipeline micro-batch
(megaseg.training.pipeline); the rest of the step is the same.

The loss is the mean NLL over every predicted token of the global batch, whatever the split
into micro-batches and data-parallel ranks, so gradient accumulation changes nothing but
memory. The data position is the number of consumed samples: global batch n is samples
[n * G, (n + 1) * G) of the training dataset, so a resumed run sees exactly the batches the
uninterrupted run would have.

Shape legend: B micro-batch, T sequence length, S segment length.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.distributed as dist

from megaseg.config import ConfigError, ModelConfig
from megaseg.training.arguments import PretrainConfig
from megaseg.checkpoint.training import locate_checkpoint, load_training_checkpoint, save_training_checkpoint
from megaseg.training.monitor import StepTimer, TrainingMonitor
from megaseg.ops import stats
from megaseg.training import pipeline
from megaseg.training.batches import (all_reduce_sum, compute_device, context_parallel_size, data_parallel_size,
                                      rank_microbatches)
from megaseg.training.precision import autocast_context, resolve_bf16
from megaseg.training.tbptt import tbptt_backward


# ---- setup ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def check_batch_sizes(cfg: PretrainConfig) -> int:
    """Micro-batches per step on each rank; global batch must split over DP x micro-batch."""
    dp = data_parallel_size()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is invalid: must be a multiple of "
            f"micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp}"
        )
    return cfg.global_batch_size // (cfg.micro_batch_size * dp)


def check_optimizer_settings(cfg: PretrainConfig) -> None:
    """Optimizer flags that cannot go together (ConfigError, one line naming both values);
    with --deepspeed, that deepspeed imports and its config agrees with the flags."""
    if cfg.deepspeed:
        from megaseg.training import deepspeed_backend

        deepspeed_backend.import_deepspeed()
        deepspeed_backend.deepspeed_config(cfg, data_parallel_size())
    if cfg.use_distributed_optimizer and cfg.optimizer != "adam":
        raise ConfigError(
            f"optimizer={cfg.optimizer!r} is invalid with use_distributed_optimizer=True: megatron-core's "
            "distributed optimizer shards and checkpoints Adam state only; use --optimizer adam"
        )


def setup_model_and_optimizer(cfg: PretrainConfig, model_config: ModelConfig, initial_weights=None):
    """(DDP-wrapped GPTModel, megatron optimizer, OptimizerParamScheduler); with ``cfg.deepspeed``
    (DeepSpeedModel, DeepSpeedOptimizer, OptimizerParamScheduler) from megaseg.training.deepspeed_backend.

    ``initial_weights`` (a reference state dict, HF Llama names) replaces the random init of
    this rank's shard before the optimizer copies any parameter (continued pretraining);
    without it the weights are `megaseg.training.initialization.initial_weights` of the run
    seed, the same at every parallel layout.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megaseg.megatron.model import build_model

    check_optimizer_settings(cfg)
    # Same seed, same initial weights, however many times a process builds a model.
    seed_everything(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    stage = pipeline.stage_build_kwargs()  # this rank's pipeline stage, if the model is split
    gpt = build_model(
        model_config,
        params_dtype=torch.float32,
        use_te=cfg.use_te,
        config_overrides={"init_method_std": cfg.init_method_std, **stage.pop("config_overrides", {})},
        **stage,
    )
    if initial_weights is None:
        from megaseg.training.initialization import initial_weights as fresh_weights

        initial_weights = fresh_weights(model_config, cfg.seed, cfg.init_method_std)
    load_reference_weights(gpt, initial_weights, model_config)
    if cfg.deepspeed:
        from megaseg.training import deepspeed_backend

        model, optimizer, _ = deepspeed_backend.setup(cfg, gpt, data_parallel_size())
        return model, optimizer, _scheduler(cfg, optimizer)
    model = DistributedDataParallel(
        config=gpt.config,
        # overlap_grad_reduce=False: the TBPTT engine's several backward calls per micro-batch
        # only accumulate into the grad buffers; `finalize_model_grads` reduces them once a step
        # (all-reduce, or reduce-scatter with the distributed optimizer).
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        ),
        module=gpt,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            sgd_momentum=cfg.sgd_momentum,
            clip_grad=cfg.clip_grad,
            params_dtype=torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        ),
        [model],
    )
    return model, optimizer, _scheduler(cfg, optimizer)


def _scheduler(cfg: PretrainConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # Megatron counts scheduler steps in samples.
    gbs = cfg.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr_warmup_init,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_iters * gbs,
        lr_decay_steps=cfg.decay_iters * gbs,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gbs,
        wd_incr_style="constant",
        # On resume the checkpoint's schedule wins (Megatron's convention) unless overridden;
        # the step count is always restored.
        use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )


def load_reference_weights(gpt, state_dict, model_config: ModelConfig) -> None:
    """Copy a reference (HF Llama-named) state dict into this tensor-parallel rank's GPTModel."""
    from megatron.core import parallel_state as ps

    from megaseg.megatron.convert import reference_to_megatron

    te_layout = any(k.endswith("linear_qkv.layer_norm_weight") for k in gpt.state_dict())
    shard = reference_to_megatron(state_dict, model_config, ps.get_tensor_model_parallel_rank(),
                                  ps.get_tensor_model_parallel_world_size(), te_layout=te_layout)
    if pipeline.pipeline_size() > 1:
        shard = pipeline.stage_state_dict(shard, gpt)
    with torch.no_grad():
        gpt.load_state_dict(shard, strict=True)


def override_learning_rates(optimizer, scheduler, cfg: PretrainConfig) -> None:
    """This run's lr/min_lr into every parameter group of a restored optimizer, then the
    current rate from the schedule: megatron's scheduler reads a group's own ``max_lr`` and
    ``min_lr`` before its own, and the restored groups carry the checkpoint run's values."""
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"] = cfg.lr
        if "min_lr" in group:
            group["min_lr"] = cfg.min_lr
    scheduler.step(increment=0)


SCHEDULE_ARGS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters", "lr_decay_style",
                 "train_iters", "weight_decay", "global_batch_size")


def schedule_changes(saved_args: dict, cfg: PretrainConfig) -> list[str]:
    """Schedule flags of this run that differ from the checkpoint's run (`name old -> new`)."""
    current = cfg.to_dict()
    return [f"{name} {saved_args[name]} -> {current[name]}" for name in SCHEDULE_ARGS
            if name in saved_args and saved_args[name] != current[name]]


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of this rank's optimizer state: Adam moments (and step counts), plus separate fp32
    main copies of 16-bit parameters. fp32 parameters are their own main copies (the
    distributed optimizer's shard of one is a view of it), so they add nothing here."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        for group in getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(opt, "fp32_from_float16_groups", None) or []:
            total += sum(p.numel() * p.element_size() for p in group)
    return total


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def uses_chunks(cfg: PretrainConfig) -> bool:
    """Whether steps run whole sequences in chunks (megaseg.parallel.context): with context
    parallelism, and for the untruncated gradient (tbptt_k = -1) on one rank too."""
    return context_parallel_size() > 1 or cfg.tbptt_k < 0


# ---- one step --------------------------------------------------------------------------------------
def compute_model(model):
    """What a forward runs: the megatron DDP wrapper, or the GPTModel under DeepSpeed."""
    return model.module if hasattr(model, "engine") else model


@dataclass
class StepMetrics:
    loss: float  # mean NLL over the global batch
    segment_losses: list[float] = field(default_factory=list)
    grad_norm: float | None = None
    lr: float = 0.0
    tokens: int = 0  # tokens processed on all ranks
    update_successful: bool = True
    segment_stats: object = None  # megaseg.ops.stats.SegmentStats of this rank's first micro-batch, when asked


def forward_backward(model, microbatches, cfg: PretrainConfig, bf16: bool, segment_forward=None,
                     segment_stats: list | None = None):
    """TBPTT-K forward/backward over micro-batches; grads accumulate in the DDP buffers.

    ``segment_forward(model, ids_BL, states) -> (logits_BLV, states)`` runs one segment
    (default: `megaseg.megatron.model.segment_forward`, the whole model on this rank); a
    model split another way passes its own. A model split into pipeline stages runs the
    windows engine (`megaseg.training.pipeline.forward_backward`) instead. Returns (sum of NLL, per-segment NLL sums,
    per-segment token counts, tokens), each summed over all data-parallel ranks. With a
    ``segment_stats`` list, the first micro-batch runs under `megaseg.ops.stats.recording`
    and its recorder is appended to the list.
    """
    if pipeline.pipeline_size() > 1:  # segment statistics are recorded without pipeline stages only
        return pipeline.forward_backward(model, microbatches, cfg, bf16)
    if segment_forward is None:
        from megaseg.megatron.model import segment_forward

    net = compute_model(model)

    def forward_segment(ids_BL, states):
        return segment_forward(net, ids_BL, states)

    # DDP divides gradients by the data x context-parallel size; scaling the loss by it makes
    # the reduced gradient that of the global token mean.
    scale = float(data_parallel_size() * context_parallel_size())
    if uses_chunks(cfg):
        from megaseg.parallel.context import ChunkLayout, chunk_backward

        layout = ChunkLayout(cfg.seq_length, cfg.segment_length, context_parallel_size())
        segment_stats = None  # statistics are recorded by the sequential engine only

        def run(tokens_BT, labels_BT, num_predicted):
            return chunk_backward(net, tokens_BT, labels_BT, layout, cfg.tbptt_k, loss_scale=scale,
                                  num_predicted=num_predicted)
    else:
        def run(tokens_BT, labels_BT, num_predicted):
            return tbptt_backward(forward_segment, tokens_BT, cfg.segment_length, cfg.tbptt_k, labels_BT=labels_BT,
                                  loss_scale=scale, num_predicted=num_predicted)

    # Every context-parallel rank holds the whole micro-batches: count once per data-parallel rank.
    local_predicted = sum(int((labels != -100).sum()) for _, labels in microbatches) / context_parallel_size()
    num_predicted = round(all_reduce_sum([local_predicted])[0])
    S = cfg.segment_length
    n_seg = -(-cfg.seq_length // S)
    nll = 0.0
    seg_sum = [0.0] * n_seg
    seg_count = [0] * n_seg
    tokens = 0
    for m, (tokens_BT, labels_BT) in enumerate(microbatches):
        recording = stats.recording() if segment_stats is not None and m == 0 else contextlib.nullcontext()
        with autocast_context(bf16), recording as rec:
            if rec is not None:
                segment_stats.append(rec)
            result = run(tokens_BT, labels_BT, num_predicted)
        nll += result.loss * num_predicted
        for i, (mean, count) in enumerate(zip(result.segment_losses, result.segment_tokens)):
            seg_sum[i] += mean * count
            seg_count[i] += count
        tokens += result.tokens
    reduced = all_reduce_sum([nll, float(tokens), *seg_sum, *map(float, seg_count)])
    nll, tokens = reduced[0], int(reduced[1])
    seg_sum, seg_count = reduced[2 : 2 + n_seg], reduced[2 + n_seg :]
    return nll, seg_sum, seg_count, tokens, num_predicted


def train_step(model, optimizer, scheduler, microbatches, cfg: PretrainConfig, bf16: bool,
               segment_forward=None, segment_stats: bool = False) -> StepMetrics:
    """One optimizer step over this rank's micro-batches of a global batch (``segment_forward``:
    see `forward_backward`; with ``segment_stats`` the first micro-batch's segment statistics
    are recorded)."""
    from megatron.core.distributed import finalize_model_grads

    model.zero_grad_buffer()
    optimizer.zero_grad()
    recorded = [] if segment_stats else None
    nll, seg_sum, seg_count, tokens, num_predicted = forward_backward(model, microbatches, cfg, bf16,
                                                                      segment_forward=segment_forward,
                                                                      segment_stats=recorded)
    lr = current_lr(optimizer)  # the rate this step applies (the scheduler then moves on)
    if hasattr(model, "engine"):  # DeepSpeed: local grads are checked, then reduced once
        finite = math.isfinite(nll) and grads_finite(model)
        if finite:
            model.reduce_gradients()
        else:
            model.zero_grad_buffer()
    else:  # megatron DDP: one all-reduce / reduce-scatter of the grad buffers
        finalize_model_grads([model])
        finite = math.isfinite(nll) and grads_finite(model)
    if finite:
        update_successful, grad_norm, _ = optimizer.step()
    else:  # a non-finite loss or gradient: no update, the batch counts as consumed
        update_successful, grad_norm = False, None
    if update_successful:
        scheduler.step(increment=cfg.global_batch_size)
    return StepMetrics(
        loss=nll / max(num_predicted, 1),
        segment_losses=[s / max(c, 1) for s, c in zip(seg_sum, seg_count)],
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        tokens=tokens,
        update_successful=bool(update_successful),
        segment_stats=recorded[0] if recorded else None,
    )


@torch.no_grad()
def grads_finite(model) -> bool:
    """Every gradient of every rank is finite (one flag, all-reduced over all ranks)."""
    buffers = list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))
    if hasattr(model, "grads_finite"):
        ok = model.grads_finite()
    elif buffers:
        ok = all(bool(torch.isfinite(b.grad_data).all()) for b in buffers)
    else:
        ok = all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters() if hasattr(p, "main_grad"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


@torch.no_grad()
def evaluate(model, dataset, cfg: PretrainConfig, bf16: bool) -> tuple[float, list[float]]:
    """Mean NLL (and per segment) over the first eval_iters global batches of ``dataset``.

    Always the same samples, so validation losses are comparable across the run. Segments
    are run one call each with the carried state (segmented execution gives the training
    forward's logits under any split into calls), so memory is that of one segment.
    """
    from megaseg.megatron.model import segment_forward

    if pipeline.pipeline_size() > 1:
        return pipeline.evaluate(model, dataset, cfg, bf16)
    model.eval()
    S = cfg.segment_length
    n_seg = -(-cfg.seq_length // S)
    seg_sum, seg_count = [0.0] * n_seg, [0.0] * n_seg
    layout = None
    if context_parallel_size() > 1:
        from megaseg.parallel.context import ChunkLayout, chunk_losses

        layout = ChunkLayout(cfg.seq_length, S, context_parallel_size())
    try:
        for it in range(cfg.eval_iters):
            for tokens_BT, labels_BT in rank_microbatches(dataset, it * cfg.global_batch_size, cfg):
                if layout is not None:  # each context-parallel rank runs its chunk, forward only
                    with autocast_context(bf16):
                        sums, counts = chunk_losses(compute_model(model), tokens_BT, labels_BT, layout)
                    seg_sum = [a + b for a, b in zip(seg_sum, sums)]
                    seg_count = [a + b for a, b in zip(seg_count, counts)]
                    continue
                states = None
                for i in range(n_seg):
                    with autocast_context(bf16):
                        logits_BLV, states = segment_forward(compute_model(model), tokens_BT[:, i * S : (i + 1) * S],
                                                             states)
                    labels_BL = labels_BT[:, i * S : (i + 1) * S]
                    seg_sum[i] += float(torch.nn.functional.cross_entropy(
                        logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=-100, reduction="sum"))
                    seg_count[i] += float((labels_BL != -100).sum())
    finally:
        model.train()
    reduced = all_reduce_sum(seg_sum + seg_count)
    seg_sum, seg_count = reduced[:n_seg], reduced[n_seg:]
    loss = sum(seg_sum) / max(sum(seg_count), 1.0)
    return loss, [s / max(c, 1.0) for s, c in zip(seg_sum, seg_count)]


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    iteration: int
    start_iteration: int
    losses: list[float]  # training loss of every step this run took
    valid_losses: list[tuple[int, float]]
    last_checkpoint: str | None
    seconds: float
    skipped_steps: int = 0  # steps without an update (non-finite loss or gradient)
    exit_reason: str | None = None  # why the run stopped before train_iters (signal, duration, interval)


INTERRUPTED_FILE = "interrupted.txt"


class ExitSignals:
    """SIGTERM/SIGUSR1 set a flag; the loop saves and exits at the next step boundary.

    `received()` is collective: every rank learns that any rank was signalled, so all save
    the same iteration. Previous handlers are restored by `close()`.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._previous = {}
        if not enabled:
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                break

    def _handle(self, signum, frame):
        self.signum = signum

    def received(self) -> int | None:
        value = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([value], dtype=torch.int64, device=compute_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            value = int(t.item())
        return value or None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _any_rank(flag: bool) -> bool:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([int(flag)], dtype=torch.int32, device=compute_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def _mark_interrupted(save: str | None, reason: str | None) -> None:
    """<save>/interrupted.txt names why a run stopped early (a job script requeues on it);
    removed when the run reaches train_iters."""
    if not save or (dist.is_initialized() and dist.get_rank() != 0):
        return
    path = os.path.join(save, INTERRUPTED_FILE)
    if reason is None:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(save, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(reason + "\n")


def pretrain(
    cfg: PretrainConfig,
    model_config: ModelConfig,
    train_dataset,
    valid_dataset=None,
    out: TextIO | None = None,
    initial_weights=None,
    hf_fields: dict | None = None,
) -> TrainResult:
    """Train ``cfg.train_iters`` steps (resuming from ``cfg.load`` if it holds a checkpoint).

    ``initial_weights`` (a reference state dict) initialises the model when there is no
    checkpoint to resume from (continued pretraining; optimizer and schedule start fresh).
    ``hf_fields`` (the base model's Hugging Face config fields) go into every checkpoint,
    so an export restores them; a resumed run keeps its checkpoint's.
    Needs megatron's model-parallel state (megaseg.megatron.parallel.initialize_model_parallel).
    Log lines go to ``out`` (default stdout) on rank 0. Raises ConfigError / CheckpointError
    for user-fixable problems, FloatingPointError after too many non-finite steps in a row.
    SIGTERM/SIGUSR1 (``exit_signal_handler``), ``exit_interval`` and ``exit_duration_in_mins``
    save a checkpoint at the next step boundary and return early (``exit_reason``).
    """
    t_start = time.perf_counter()
    num_micro = check_batch_sizes(cfg)
    bf16 = resolve_bf16(cfg.bf16)
    is_logger = not dist.is_initialized() or dist.get_rank() == 0
    monitor = TrainingMonitor(cfg.tensorboard_dir, cfg.log_interval, cfg.train_iters, enabled=is_logger, out=out)
    say = monitor.log

    from megaseg.training.ownership import claim_save_directory, prune_checkpoints, remove_other_checkpoints

    cfg = claim_save_directory(cfg, say)
    resume_from = locate_checkpoint(cfg.load, allow_missing=cfg.load == cfg.save) if cfg.load else None
    if resume_from is not None and initial_weights is not None:
        say(f"{resume_from} exists: resuming from it, not from the pretrained weights")
        initial_weights = None
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config, initial_weights)
    if initial_weights is not None:
        say(f"initialised from the pretrained weights of {cfg.pretrained_checkpoint or 'the caller'}; "
            "optimizer and learning-rate schedule start fresh")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {model_config.num_layers} layers, hidden {model_config.hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters (this rank), vocab {model_config.vocab_size}; "
        f"segments S={cfg.segment_length} M={cfg.tail_length} R={cfg.retrieval_length} K={cfg.tbptt_k}; "
        f"{'bf16 autocast' if bf16 else 'fp32'}; data-parallel {data_parallel_size()}"
        f"{f', context-parallel {context_parallel_size()}' if context_parallel_size() > 1 else ''}"
        f"{f', pipeline stages {pipeline.pipeline_size()}' if pipeline.pipeline_size() > 1 else ''}"
        f"{' (distributed optimizer)' if cfg.use_distributed_optimizer else ''}"
        f"{' (DeepSpeed ZeRO)' if cfg.deepspeed else ''}, "
        f"{num_micro} micro-batch(es) of {cfg.micro_batch_size} per step")

    iteration, consumed = 0, 0
    model_cfg_dict = model_config.to_dict()
    if resume_from is not None:
        loaded = load_training_checkpoint(resume_from, model, optimizer, scheduler, model_config=model_cfg_dict,
                                          load_optimizer=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
        iteration, consumed = loaded.iteration, loaded.consumed_train_samples
        hf_fields = hf_fields or loaded.hf
        if cfg.no_load_optim:
            scheduler.step(increment=iteration * cfg.global_batch_size)
        elif cfg.override_opt_param_scheduler:
            override_learning_rates(optimizer, scheduler, cfg)
        say(f"resumed from {loaded.path}: iteration {iteration}, {consumed} samples consumed")
        changes = schedule_changes(loaded.args, cfg)
        if changes and not cfg.no_load_optim:
            if cfg.override_opt_param_scheduler:
                say(f"note: learning-rate schedule from this run's flags ({'; '.join(changes)})")
            else:
                say(f"note: learning-rate schedule continues from the checkpoint; this run's {'; '.join(changes)} "
                    "do not change it (--override-opt-param-scheduler to use them)")
        if not loaded.rng_restored and not cfg.no_load_rng:
            say("RNG states not restored: the checkpoint was saved with another tensor/pipeline-parallel "
                "layout (weights and optimizer state were resharded)")
    elif cfg.load:
        say(f"no checkpoint in {cfg.load} yet; starting {'from the pretrained weights' if initial_weights else 'from scratch'}")
    start_iteration = iteration
    if iteration >= cfg.train_iters:
        say(f"already trained to iteration {iteration} (train_iters={cfg.train_iters}); nothing to do")

    losses, valid_losses = [], []
    last_checkpoint = None
    saved_at = iteration if resume_from is not None else None
    skipped, skipped_in_a_row = 0, 0
    exit_reason = None
    replaced: list[str] = []  # --overwrite-checkpoints: the first checkpoint, once the old ones are gone

    def save():
        nonlocal last_checkpoint, saved_at
        t = time.perf_counter()
        last_checkpoint = save_training_checkpoint(
            cfg.save, iteration, model, optimizer, scheduler,
            consumed_train_samples=consumed,
            args=cfg.to_dict(), model_config=model_cfg_dict, tokenizer_model=cfg.tokenizer_model, hf=hf_fields,
        )
        saved_at = iteration
        say(f"saved checkpoint {last_checkpoint} ({time.perf_counter() - t:.1f} s)")
        if cfg.keep_last_n:
            if not dist.is_initialized() or dist.get_rank() == 0:
                prune_checkpoints(cfg.save, cfg.keep_last_n, protect=resume_from)
            if dist.is_initialized():
                dist.barrier()
        if cfg.overwrite_checkpoints and resume_from is None and not replaced:
            replaced.append(last_checkpoint)
            if not dist.is_initialized() or dist.get_rank() == 0:
                removed = remove_other_checkpoints(cfg.save, last_checkpoint)
                if removed:
                    say(f"--overwrite-checkpoints: removed the earlier checkpoints {', '.join(removed)}")
            if dist.is_initialized():
                dist.barrier()

    def validate():
        t = time.perf_counter()
        loss, seg = evaluate(model, valid_dataset, cfg, bf16)
        valid_losses.append((iteration, loss))
        monitor.record_validation(iteration, loss, seg, time.perf_counter() - t)

    def should_exit() -> str | None:
        signum = signals.received()
        if signum is not None:
            return f"signal {signal.Signals(signum).name} at iteration {iteration}"
        if cfg.exit_duration_in_mins is not None and _any_rank(
                time.perf_counter() - t_start > 60 * cfg.exit_duration_in_mins):
            return f"exit_duration_in_mins={cfg.exit_duration_in_mins} reached at iteration {iteration}"
        if cfg.exit_interval and iteration % cfg.exit_interval == 0 and iteration < cfg.train_iters:
            return f"exit_interval={cfg.exit_interval} at iteration {iteration}"
        return None

    do_eval = valid_dataset is not None and cfg.eval_iters > 0
    signals = ExitSignals(cfg.exit_signal_handler)
    try:
        while iteration < cfg.train_iters:
            with StepTimer() as timer:
                microbatches = rank_microbatches(train_dataset, consumed, cfg)
                want_stats = monitor.writer is not None and bool(cfg.log_segment_stats_interval) and (
                    (iteration + 1) % cfg.log_segment_stats_interval == 0 or iteration == start_iteration)
                metrics = train_step(model, optimizer, scheduler, microbatches, cfg, bf16, segment_stats=want_stats)
            iteration += 1
            consumed += cfg.global_batch_size
            losses.append(metrics.loss)
            if metrics.update_successful:
                skipped_in_a_row = 0
            else:
                skipped += 1
                skipped_in_a_row += 1
                say(f"iteration {iteration}: non-finite loss ({metrics.loss}) or gradient; step skipped "
                    f"({skipped_in_a_row} in a row, {skipped} in this run)")
                if skipped_in_a_row > cfg.max_consecutive_skipped_steps:
                    where = f"; the last good checkpoint is {cfg.save} (iteration {saved_at})" if saved_at else ""
                    raise FloatingPointError(
                        f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (iteration {iteration}, "
                        f"max_consecutive_skipped_steps={cfg.max_consecutive_skipped_steps}); lower --lr{where}")
            monitor.record_step(iteration, metrics.loss, metrics.segment_losses, metrics.lr, metrics.grad_norm,
                                metrics.tokens, timer.seconds, consumed, skipped_steps=skipped)
            if metrics.segment_stats is not None:
                monitor.record_segment_stats(iteration, *metrics.segment_stats.summary(metrics.grad_norm))
            if do_eval and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
                validate()
            if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
                save()
            exit_reason = should_exit()
            if exit_reason is not None:
                say(f"stopping: {exit_reason}")
                break
        if cfg.save and saved_at != iteration:
            save()
        if exit_reason is None or not exit_reason.startswith("exit_interval"):
            _mark_interrupted(cfg.save, exit_reason)
    finally:
        signals.close()
        monitor.close()
    seconds = time.perf_counter() - t_start
    say(f"done: iteration {iteration}, {len(losses)} steps in {seconds:.1f} s"
        + (f" ({skipped} skipped)" if skipped else ""))
    return TrainResult(iteration, start_iteration, losses, valid_losses, last_checkpoint, seconds, skipped, exit_reason)
