"""The pretraining loop: megatron-core GPTModel + DDP + optimizer, driven by a step engine.

    engine = select_engine(cfg, model, bf16)            # megaseg.training.engines, once
    while iteration < train_iters:
        metrics = train_step(engine, optimizer, scheduler, rank_microbatches(...))
        monitor / skip policy / validator / checkpointer / exit policy   # megaseg.training.policies

One optimizer step (`megaseg.training.engines.train_step`): zero the grad buffers; the
engine's forward and backward of every micro-batch of this rank's share of the global batch
(the exact L_K gradient, docs/semantics.md §5); the engine's gradient reduction; the
optimizer step (global grad-norm clipping, AdamW); the scheduler (warmup, then decay).

The loss is the mean NLL over every predicted token of the global batch, whatever the split
into micro-batches and ranks, so gradient accumulation changes nothing but memory. The data
position is the number of consumed samples: global batch n is samples [n * G, (n + 1) * G)
of the training dataset, so a resumed run sees exactly the batches the uninterrupted run
would have.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

import torch.distributed as dist

from megaseg.checkpoint.training import load_training_checkpoint, locate_checkpoint
from megaseg.config import ModelConfig
from megaseg.training.arguments import PretrainConfig
from megaseg.training.batches import context_parallel_size, data_parallel_size, rank_microbatches
from megaseg.training.engines import select_engine, train_step
from megaseg.training.monitor import StepTimer, TrainingMonitor
from megaseg.training.pipeline import pipeline_size
from megaseg.training.policies import INTERRUPTED_FILE, Checkpointer, ExitPolicy, SkipPolicy, Validator
from megaseg.training.precision import resolve_bf16
from megaseg.training.setup import (check_batch_sizes, override_learning_rates, schedule_changes,
                                    setup_model_and_optimizer)

__all__ = ["INTERRUPTED_FILE", "TrainResult", "pretrain"]


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


def _startup_line(cfg, model_config, model, engine, bf16: bool, num_micro: int) -> str:
    from megatron.core import parallel_state as ps

    n_params = sum(p.numel() for p in model.parameters())
    layout = [f"data-parallel {data_parallel_size()}"]
    for name, size in (("tensor-parallel", ps.get_tensor_model_parallel_world_size()),
                       ("context-parallel", context_parallel_size()), ("pipeline stages", pipeline_size())):
        if size > 1:
            layout.append(f"{name} {size}")
    return (f"model: {model_config.num_layers} layers, hidden {model_config.hidden_size}, "
            f"{n_params / 1e6:.2f}M parameters (this rank), vocab {model_config.vocab_size}; "
            f"segments S={cfg.segment_length} M={cfg.tail_length} R={cfg.retrieval_length} K={cfg.tbptt_k}; "
            f"{'bf16 autocast' if bf16 else 'fp32'}; {', '.join(layout)}"
            f"{' (distributed optimizer)' if cfg.use_distributed_optimizer else ''}"
            f"{' (DeepSpeed ZeRO)' if cfg.deepspeed else ''}, "
            f"{num_micro} micro-batch(es) of {cfg.micro_batch_size} per step; {engine.name} engine")


def _resume(cfg, resume_from, model, optimizer, scheduler, model_cfg_dict, say):
    """Load ``resume_from``; (iteration, consumed samples, the checkpoint's HF fields)."""
    loaded = load_training_checkpoint(resume_from, model, optimizer, scheduler, model_config=model_cfg_dict,
                                      load_optimizer=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
    iteration = loaded.iteration
    if cfg.no_load_optim:
        scheduler.step(increment=iteration * cfg.global_batch_size)
    elif cfg.override_opt_param_scheduler:
        override_learning_rates(optimizer, scheduler, cfg)
    say(f"resumed from {loaded.path}: iteration {iteration}, {loaded.consumed_train_samples} samples consumed")
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
    return iteration, loaded.consumed_train_samples, loaded.hf


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
    run = _start(cfg, model_config, out, initial_weights, hf_fields)
    cfg, say, monitor = run.cfg, run.say, run.monitor
    checkpointer = Checkpointer(cfg, run.model, run.optimizer, run.scheduler, model_config=model_config.to_dict(),
                                hf_fields=run.hf_fields, resume_from=run.resume_from, say=say)
    checkpointer.saved_at = run.iteration if run.resume_from is not None else None
    policies = _Policies(checkpointer, Validator(cfg, run.engine, valid_dataset, monitor), SkipPolicy(cfg, say),
                         ExitPolicy(cfg, run.t_start))
    losses, exit_reason = [], None
    try:
        while run.iteration < cfg.train_iters:
            losses.append(_train_one_step(run, train_dataset, policies))
            exit_reason = policies.exits.reason(run.iteration)
            if exit_reason is not None:
                say(f"stopping: {exit_reason}")
                break
        if cfg.save and checkpointer.saved_at != run.iteration:
            checkpointer.save(run.iteration, run.consumed)
        checkpointer.close()
        if exit_reason is None or not exit_reason.startswith("exit_interval"):
            checkpointer.mark_interrupted(exit_reason)
    finally:
        policies.exits.close()
        monitor.close()
    seconds = time.perf_counter() - run.t_start
    skipped = policies.skips.skipped
    say(f"done: iteration {run.iteration}, {len(losses)} steps in {seconds:.1f} s"
        + (f" ({skipped} skipped)" if skipped else ""))
    return TrainResult(run.iteration, run.start_iteration, losses, policies.validator.losses,
                       checkpointer.last_checkpoint, seconds, skipped, exit_reason)


@dataclass
class _Run:
    """What the loop carries: the built run and its position."""

    cfg: PretrainConfig
    monitor: TrainingMonitor
    model: object
    optimizer: object
    scheduler: object
    engine: object
    resume_from: str | None
    hf_fields: dict | None
    t_start: float
    wants_stats: bool
    iteration: int = 0
    consumed: int = 0
    start_iteration: int = 0

    def say(self, line: str) -> None:
        self.monitor.log(line)


@dataclass
class _Policies:
    checkpointer: Checkpointer
    validator: Validator
    skips: SkipPolicy
    exits: ExitPolicy


def _start(cfg, model_config, out, initial_weights, hf_fields) -> _Run:
    """Claim the save directory, build the model, optimizer, schedule and engine, and resume
    from a checkpoint if there is one."""
    from megaseg.training.ownership import claim_save_directory

    t_start = time.perf_counter()
    num_micro = check_batch_sizes(cfg)
    bf16 = resolve_bf16(cfg.bf16)
    is_logger = not dist.is_initialized() or dist.get_rank() == 0
    monitor = TrainingMonitor(cfg.tensorboard_dir, cfg.log_interval, cfg.train_iters, enabled=is_logger, out=out)
    say = monitor.log
    cfg = claim_save_directory(cfg, say)
    resume_from = locate_checkpoint(cfg.load, allow_missing=cfg.load == cfg.save) if cfg.load else None
    if resume_from is not None and initial_weights is not None:
        say(f"{resume_from} exists: resuming from it, not from the pretrained weights")
        initial_weights = None
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config, initial_weights)
    engine = select_engine(cfg, model, bf16)
    if initial_weights is not None:
        say(f"initialised from the pretrained weights of {cfg.pretrained_checkpoint or 'the caller'}; "
            "optimizer and learning-rate schedule start fresh")
    say(_startup_line(cfg, model_config, model, engine, bf16, num_micro))
    if engine.frozen is not None:
        say(engine.frozen.describe())
    wants_stats = monitor.writer is not None and bool(cfg.log_segment_stats_interval)
    if wants_stats and not engine.supports_segment_stats:
        say(f"note: segment statistics (--log-segment-stats-interval) are not recorded by the {engine.name} "
            "engine; they are recorded without context or pipeline parallelism")
        wants_stats = False
    run = _Run(cfg, monitor, model, optimizer, scheduler, engine, resume_from, hf_fields, t_start, wants_stats)
    if resume_from is not None:
        run.iteration, run.consumed, loaded_hf = _resume(cfg, resume_from, model, optimizer, scheduler,
                                                         model_config.to_dict(), say)
        run.hf_fields = hf_fields or loaded_hf
    elif cfg.load:
        say(f"no checkpoint in {cfg.load} yet; starting {'from the pretrained weights' if initial_weights else 'from scratch'}")
    run.start_iteration = run.iteration
    if run.iteration >= cfg.train_iters:
        say(f"already trained to iteration {run.iteration} (train_iters={cfg.train_iters}); nothing to do")
    return run


def _train_one_step(run: _Run, train_dataset, policies: _Policies) -> float:
    """One optimizer step, its log line, and the policies at its boundary; the step's loss."""
    cfg = run.cfg
    record_stats = run.wants_stats and ((run.iteration + 1) % cfg.log_segment_stats_interval == 0
                                        or run.iteration == run.start_iteration)
    with StepTimer() as timer:
        metrics = train_step(run.engine, run.optimizer, run.scheduler,
                             rank_microbatches(train_dataset, run.consumed, cfg), record_stats=record_stats)
    run.iteration += 1
    run.consumed += cfg.global_batch_size
    it = run.iteration
    policies.skips.record(it, metrics, policies.checkpointer.saved_at)
    run.monitor.record_step(it, metrics.loss, metrics.segment_losses, metrics.lr, metrics.grad_norm, metrics.tokens,
                            timer.seconds, run.consumed, skipped_steps=policies.skips.skipped)
    if metrics.segment_stats is not None:
        run.monitor.record_segment_stats(it, *metrics.segment_stats.summary(metrics.grad_norm))
    if policies.validator.due(it):
        policies.validator.run(it)
    if policies.checkpointer.due(it):
        policies.checkpointer.save(it, run.consumed)
    policies.checkpointer.poll()
    return metrics.loss
