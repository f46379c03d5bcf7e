"""Building a run: the megatron-core GPTModel in DDP (or DeepSpeed), its optimizer and its
learning-rate schedule, and the checks and conversions around them (batch arithmetic,
optimizer flags, pretrained weights, a resumed run's schedule changes).
"""
from __future__ import annotations

import random

import torch

from megaseg.config import ConfigError, ModelConfig
from megaseg.training import pipeline
from megaseg.training.arguments import PretrainConfig
from megaseg.training.batches import data_parallel_size


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
        config_overrides={"init_method_std": cfg.init_method_std, **cfg.recompute_overrides(),
                          **stage.pop("config_overrides", {})},
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
    model, optimizer = _ddp_and_optimizer(cfg, gpt)
    return model, optimizer, _scheduler(cfg, optimizer)


def _ddp_and_optimizer(cfg: PretrainConfig, gpt):
    """(megatron-core DistributedDataParallel around ``gpt``, its megatron optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
    return model, optimizer


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
