#!/usr/bin/env python
"""Pretrain a megaseg GPT: megatron-core GPTModel with segmented attention, trained with TBPTT-K.

    python pretrain/pretrain_gpt.py                                   # the default run
    python pretrain/pretrain_gpt.py --load runs/default/checkpoints --train-iters 150
    python pretrain/pretrain_gpt.py --config examples/default.yaml --num-layers 6
    torchrun --nproc-per-node 2 pretrain/pretrain_gpt.py --config examples/default.yaml

With no arguments it prepares the default dataset (Python stdlib sources, no download) in
data/default if it is not there yet, then trains a 4-layer, 256-hidden model on
2048-token sequences cut into 512-token segments, writing checkpoints to
runs/default/checkpoints and TensorBoard events to runs/default/tensorboard.
`--help` lists every flag; each is also a key of the YAML file given with --config.

Errors a user can cause (flags, YAML, data, checkpoints) print one line and exit 1
(2 for malformed flags).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning (set before torch loads OpenMP). On a CPU
# whose cores are shared, spinning workers of an oversubscribed pool made steps 3-5x
# slower; on an idle machine the cost is negligible. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import megaseg  # noqa: F401
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# megatron-core warns on import when Transformer Engine/Apex are absent; its local
# fallbacks are what runs on CPU, so the warning is noise here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", module=r"megatron\.")
# torch.distributed deprecation notices for APIs that megatron-core 0.16.1 calls.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")

from megaseg.config import ConfigError  # noqa: E402
from megaseg.training.arguments import PretrainConfig, parse_args  # noqa: E402
from megaseg.training.checkpointing import CheckpointError  # noqa: E402

PROG = "pretrain_gpt.py"


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_data(cfg: PretrainConfig) -> tuple[list[str], str]:
    """(megatron blend, tokenizer model path); prepares the default dataset when no data is given.

    Collective: rank 0 prepares, the others wait at a barrier and then find it complete.
    """
    import torch.distributed as dist

    if cfg.data_path:
        if not cfg.tokenizer_model:
            raise ConfigError("tokenizer_model=None is invalid: --data-path needs --tokenizer-model")
        return list(cfg.data_path), cfg.tokenizer_model

    from megaseg.data.default_data import prepare_default_data

    say = print if _is_rank0() else (lambda *_: None)
    data = None
    if _is_rank0():
        data = prepare_default_data(cfg.default_data_dir, log=lambda msg: say(f"default data: {msg}"))
    if dist.is_initialized():
        dist.barrier()
    if data is None:
        data = prepare_default_data(cfg.default_data_dir, log=lambda msg: None)
    return [data.data_prefix], cfg.tokenizer_model or str(data.tokenizer_model)


def build_datasets(cfg: PretrainConfig, blend: list[str], tokenizer):
    from megaseg.data.datasets import build_train_valid_datasets

    valid_samples = cfg.eval_iters * cfg.global_batch_size
    try:
        datasets = build_train_valid_datasets(
            blend,
            tokenizer,
            seq_length=cfg.seq_length,
            num_samples=(cfg.train_iters * cfg.global_batch_size, valid_samples, 0),
            split=cfg.split,
            seed=cfg.seed,
            path_to_cache=cfg.data_cache_path,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"data_path={cfg.data_path!r} is invalid: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data_path={cfg.data_path!r} is invalid: {exc}") from None
    return datasets.train, (datasets.valid if valid_samples else None)


def run(cfg: PretrainConfig) -> int:
    from megaseg.data.tokenizer import validate_tokenizer
    from megaseg.megatron import parallel
    from megaseg.ops import kernels
    from megaseg.training.checkpointing import locate_checkpoint
    from megaseg.training.trainer import check_batch_sizes, pretrain, resolve_bf16

    parallel.initialize_model_parallel(
        tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size, seed=cfg.seed
    )
    try:
        # Everything that can be checked cheaply is checked before data preparation.
        check_batch_sizes(cfg)
        resolve_bf16(cfg.bf16)
        kernels.set_default(cfg.attention_kernel)
        if cfg.load:
            locate_checkpoint(cfg.load, allow_missing=cfg.load == cfg.save)
        blend, tokenizer_model = resolve_data(cfg)
        tokenizer = validate_tokenizer(tokenizer_model)
        if cfg.vocab_size is not None and cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"vocab_size={cfg.vocab_size} is invalid: the tokenizer {tokenizer_model} has "
                f"{tokenizer.vocab_size} tokens"
            )
        model_config = cfg.model_config(tokenizer.vocab_size)
        train, valid = build_datasets(cfg, blend, tokenizer)
        pretrain(cfg, model_config, train, valid)
    finally:
        parallel.destroy_model_parallel()
    return 0


def main(argv=None) -> int:
    from megaseg.data.preprocess import DataError
    from megaseg.data.tokenizer import TokenizerError

    user_errors = (ConfigError, CheckpointError, DataError, TokenizerError, FloatingPointError)
    try:
        cfg = parse_args(argv, prog=PROG)
        return run(cfg)
    except user_errors as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last complete checkpoint is intact", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
