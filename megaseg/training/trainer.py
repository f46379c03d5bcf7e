"""The pretraining loop: megatron-core GPTModel + DDP + optimizer, driven by the TBPTT-K engine.

One optimizer step (`train_step`):

    zero the DDP grad buffers
    for each micro-batch of this rank's share of the global batch:
        tbptt_backward(segment_forward(model, ...), tokens, S, K)   # forward + exact L_K backward
    finalize_model_grads          # data-parallel all-reduce (megatron-core)
    optimizer.step()              # clips the global grad norm, AdamW
    scheduler.step(global_batch)  # linear warmup, then cosine (or linear/constant) decay

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
import random
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.distributed as dist

from megaseg.config import ConfigError, ModelConfig
from megaseg.training.arguments import PretrainConfig
from megaseg.training.checkpointing import load_checkpoint, save_checkpoint
from megaseg.training.monitor import StepTimer, TrainingMonitor
from megaseg.training.tbptt import tbptt_backward


# ---- precision ----------------------------------------------------------------------------------
def bf16_supported() -> bool:
    """bf16 autocast with native hardware support: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_bf16(requested: bool | None) -> bool:
    """None (auto) -> bf16 on CUDA when supported; on CPU fp32 (faster at small sizes).

    Explicit True on hardware without bf16 support is a ConfigError.
    """
    if requested is None:
        return torch.cuda.is_available() and bf16_supported()
    if requested and not bf16_supported():
        raise ConfigError("bf16=True is invalid: this machine has no native bf16 support; use --no-bf16")
    return bool(requested)


def autocast_context(bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


# ---- setup ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def check_batch_sizes(cfg: PretrainConfig) -> int:
    """Micro-batches per step on each rank; global batch must split over DP x micro-batch."""
    dp = data_parallel_size()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is invalid: must be a multiple of "
            f"micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp}"
        )
    return cfg.global_batch_size // (cfg.micro_batch_size * dp)


def setup_model_and_optimizer(cfg: PretrainConfig, model_config: ModelConfig):
    """(DDP-wrapped GPTModel, megatron optimizer, OptimizerParamScheduler)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megaseg.megatron.model import build_model

    # Same seed, same initial weights, however many times a process builds a model.
    seed_everything(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    gpt = build_model(
        model_config,
        params_dtype=torch.float32,
        use_te=cfg.use_te,
        config_overrides={"init_method_std": cfg.init_method_std},
    )
    model = DistributedDataParallel(
        config=gpt.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
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
        ),
        [model],
    )
    # Megatron counts scheduler steps in samples.
    gbs = cfg.global_batch_size
    scheduler = OptimizerParamScheduler(
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
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # this run's schedule flags win; the step count is restored
    )
    return model, optimizer, scheduler


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ---- data ----------------------------------------------------------------------------------------
def get_batch(dataset, first_sample: int, count: int, seq_length: int):
    """tokens [count, T] and labels [count, T] (-100 where the loss is masked) of samples
    first_sample .. first_sample + count - 1 (wrapping around the dataset)."""
    tokens, labels = [], []
    n = len(dataset)
    for i in range(first_sample, first_sample + count):
        sample = dataset[i % n]
        t, lab = sample["tokens"], sample["labels"]
        if "loss_mask" in sample:
            lab = lab.masked_fill(sample["loss_mask"] == 0, -100)
        tokens.append(torch.as_tensor(t, dtype=torch.long))
        labels.append(torch.as_tensor(lab, dtype=torch.long))
    tokens_BT, labels_BT = torch.stack(tokens), torch.stack(labels)
    if tokens_BT.shape[1] != seq_length:
        raise ConfigError(
            f"seq_length={seq_length} is invalid: the dataset yields sequences of {tokens_BT.shape[1]} tokens"
        )
    return tokens_BT, labels_BT


def rank_microbatches(dataset, consumed: int, cfg: PretrainConfig):
    """This DP rank's micro-batches of the global batch that starts at sample ``consumed``."""
    per_rank = cfg.global_batch_size // data_parallel_size()
    start = consumed + data_parallel_rank() * per_rank
    return [
        get_batch(dataset, start + m, cfg.micro_batch_size, cfg.seq_length)
        for m in range(0, per_rank, cfg.micro_batch_size)
    ]


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and data_parallel_size() > 1:
        from megatron.core import parallel_state

        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


# ---- one step --------------------------------------------------------------------------------------
@dataclass
class StepMetrics:
    loss: float  # mean NLL over the global batch
    segment_losses: list[float] = field(default_factory=list)
    grad_norm: float | None = None
    lr: float = 0.0
    tokens: int = 0  # tokens processed on all ranks
    update_successful: bool = True


def forward_backward(model, microbatches, cfg: PretrainConfig, bf16: bool):
    """TBPTT-K forward/backward over micro-batches; grads accumulate in the DDP buffers.

    Returns (sum of NLL, per-segment NLL sums, per-segment token counts, tokens), each summed
    over all data-parallel ranks.
    """
    from megaseg.megatron.model import segment_forward

    def forward_segment(ids_BL, states):
        return segment_forward(model, ids_BL, states)

    dp = data_parallel_size()
    local_predicted = sum(int((labels != -100).sum()) for _, labels in microbatches)
    num_predicted = int(_all_reduce_sum([local_predicted])[0])
    S = cfg.segment_length
    n_seg = -(-cfg.seq_length // S)
    nll = 0.0
    seg_sum = [0.0] * n_seg
    seg_count = [0] * n_seg
    tokens = 0
    for tokens_BT, labels_BT in microbatches:
        with autocast_context(bf16):
            # DDP divides gradients by dp; loss_scale=dp makes the result the global token mean.
            result = tbptt_backward(forward_segment, tokens_BT, S, cfg.tbptt_k, labels_BT=labels_BT,
                                    loss_scale=float(dp), num_predicted=num_predicted)
        nll += result.loss * num_predicted
        for i, (mean, count) in enumerate(zip(result.segment_losses, result.segment_tokens)):
            seg_sum[i] += mean * count
            seg_count[i] += count
        tokens += result.tokens
    reduced = _all_reduce_sum([nll, float(tokens), *seg_sum, *map(float, seg_count)])
    nll, tokens = reduced[0], int(reduced[1])
    seg_sum, seg_count = reduced[2 : 2 + n_seg], reduced[2 + n_seg :]
    return nll, seg_sum, seg_count, tokens, num_predicted


def train_step(model, optimizer, scheduler, microbatches, cfg: PretrainConfig, bf16: bool) -> StepMetrics:
    """One optimizer step over this rank's micro-batches of a global batch."""
    from megatron.core.distributed import finalize_model_grads

    model.zero_grad_buffer()
    optimizer.zero_grad()
    nll, seg_sum, seg_count, tokens, num_predicted = forward_backward(model, microbatches, cfg, bf16)
    finalize_model_grads([model])
    lr = current_lr(optimizer)  # the rate this step applies (the scheduler then moves on)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=cfg.global_batch_size)
    return StepMetrics(
        loss=nll / max(num_predicted, 1),
        segment_losses=[s / max(c, 1) for s, c in zip(seg_sum, seg_count)],
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        tokens=tokens,
        update_successful=bool(update_successful),
    )


@torch.no_grad()
def evaluate(model, dataset, cfg: PretrainConfig, bf16: bool) -> tuple[float, list[float]]:
    """Mean NLL (and per segment) over the first eval_iters global batches of ``dataset``.

    Always the same samples, so validation losses are comparable across the run. Segments
    are run one call each with the carried state (segmented execution gives the training
    forward's logits under any split into calls), so memory is that of one segment.
    """
    from megaseg.megatron.model import segment_forward

    model.eval()
    S = cfg.segment_length
    n_seg = -(-cfg.seq_length // S)
    seg_sum, seg_count = [0.0] * n_seg, [0.0] * n_seg
    try:
        for it in range(cfg.eval_iters):
            for tokens_BT, labels_BT in rank_microbatches(dataset, it * cfg.global_batch_size, cfg):
                states = None
                for i in range(n_seg):
                    with autocast_context(bf16):
                        logits_BLV, states = segment_forward(model, tokens_BT[:, i * S : (i + 1) * S], states)
                    labels_BL = labels_BT[:, i * S : (i + 1) * S]
                    seg_sum[i] += float(torch.nn.functional.cross_entropy(
                        logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=-100, reduction="sum"))
                    seg_count[i] += float((labels_BL != -100).sum())
    finally:
        model.train()
    reduced = _all_reduce_sum(seg_sum + seg_count)
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


def pretrain(
    cfg: PretrainConfig,
    model_config: ModelConfig,
    train_dataset,
    valid_dataset=None,
    out: TextIO | None = None,
) -> TrainResult:
    """Train ``cfg.train_iters`` steps (resuming from ``cfg.load`` if it holds a checkpoint).

    Needs megatron's model-parallel state (megaseg.megatron.parallel.initialize_model_parallel).
    Log lines go to ``out`` (default stdout) on rank 0. Raises ConfigError / CheckpointError
    for user-fixable problems.
    """
    t_start = time.perf_counter()
    num_micro = check_batch_sizes(cfg)
    bf16 = resolve_bf16(cfg.bf16)
    is_logger = not dist.is_initialized() or dist.get_rank() == 0
    monitor = TrainingMonitor(cfg.tensorboard_dir, cfg.log_interval, cfg.train_iters, enabled=is_logger, out=out)
    say = monitor.log

    model, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {model_config.num_layers} layers, hidden {model_config.hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters (this rank), vocab {model_config.vocab_size}; "
        f"segments S={cfg.segment_length} M={cfg.tail_length} R={cfg.retrieval_length} K={cfg.tbptt_k}; "
        f"{'bf16 autocast' if bf16 else 'fp32'}; data-parallel {data_parallel_size()}, "
        f"{num_micro} micro-batch(es) of {cfg.micro_batch_size} per step")

    iteration, consumed = 0, 0
    model_cfg_dict = model_config.to_dict()
    if cfg.load:
        loaded = load_checkpoint(cfg.load, model, optimizer, scheduler, model_config=model_cfg_dict,
                                 load_optimizer=not cfg.no_load_optim, load_rng=not cfg.no_load_rng,
                                 allow_missing=cfg.load == cfg.save)
        if loaded is None:
            say(f"no checkpoint in {cfg.load} yet; starting from scratch")
        else:
            iteration, consumed = loaded.iteration, loaded.consumed_train_samples
            if cfg.no_load_optim:
                scheduler.step(increment=iteration * cfg.global_batch_size)
            say(f"resumed from {loaded.path}: iteration {iteration}, {consumed} samples consumed")
            if not loaded.rng_restored and not cfg.no_load_rng:
                say("RNG states not restored: the checkpoint was saved with another tensor/pipeline-parallel "
                    "layout (weights and optimizer state were resharded)")
    start_iteration = iteration
    if iteration >= cfg.train_iters:
        say(f"already trained to iteration {iteration} (train_iters={cfg.train_iters}); nothing to do")

    losses, valid_losses = [], []
    last_checkpoint = None
    saved_at = iteration if cfg.load else None

    def save():
        nonlocal last_checkpoint, saved_at
        t = time.perf_counter()
        last_checkpoint = save_checkpoint(
            cfg.save, iteration, model, optimizer, scheduler,
            consumed_train_samples=consumed,
            args=cfg.to_dict(), model_config=model_cfg_dict,
        )
        saved_at = iteration
        say(f"saved checkpoint {last_checkpoint} ({time.perf_counter() - t:.1f} s)")

    def validate():
        t = time.perf_counter()
        loss, seg = evaluate(model, valid_dataset, cfg, bf16)
        valid_losses.append((iteration, loss))
        monitor.record_validation(iteration, loss, seg, time.perf_counter() - t)

    do_eval = valid_dataset is not None and cfg.eval_iters > 0
    try:
        while iteration < cfg.train_iters:
            with StepTimer() as timer:
                microbatches = rank_microbatches(train_dataset, consumed, cfg)
                metrics = train_step(model, optimizer, scheduler, microbatches, cfg, bf16)
            iteration += 1
            consumed += cfg.global_batch_size
            if not math.isfinite(metrics.loss):
                raise FloatingPointError(f"loss is {metrics.loss} at iteration {iteration}; lower --lr")
            losses.append(metrics.loss)
            monitor.record_step(iteration, metrics.loss, metrics.segment_losses, metrics.lr, metrics.grad_norm,
                                metrics.tokens, timer.seconds, consumed)
            if do_eval and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
                validate()
            if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
                save()
        if cfg.save and saved_at != iteration:
            save()
    finally:
        monitor.close()
    seconds = time.perf_counter() - t_start
    say(f"done: iteration {iteration}, {len(losses)} steps in {seconds:.1f} s")
    return TrainResult(iteration, start_iteration, losses, valid_losses, last_checkpoint, seconds)
