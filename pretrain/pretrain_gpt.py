#!/usr/bin/env python
"""Pretrain a megaseg GPT: megatron-core GPTModel with segmented attention, trained with TBPTT-K.

    python pretrain/pretrain_gpt.py                                   # the default run
    python pretrain/pretrain_gpt.py --load runs/default/checkpoints --train-iters 150
    python pretrain/pretrain_gpt.py --config examples/default.yaml --num-layers 6
    python pretrain/pretrain_gpt.py --pretrained-checkpoint HF_LLAMA_DIR --head-plan-preset interleaved ...
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
from megaseg.checkpoint.errors import CheckpointError  # noqa: E402

PROG = "pretrain_gpt.py"


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_data(cfg: PretrainConfig) -> tuple[list[str], str]:
    """(megatron blend, tokenizer model path); prepares the default dataset when no data is given.

    The default dataset is tokenized with ``cfg.tokenizer_model`` when one is set (e.g. the
    tokenizer of a pretrained checkpoint), in a directory of its own; otherwise it trains
    its own tokenizer. Collective: rank 0 prepares, the others wait at a barrier and then
    find it complete.
    """
    import torch.distributed as dist

    if cfg.data_path:
        if not cfg.tokenizer_model:
            raise ConfigError("tokenizer_model=None is invalid: --data-path needs --tokenizer-model")
        return list(cfg.data_path), cfg.tokenizer_model
    if cfg.tokenizer_model:
        from megaseg.data.tokenizer import load_tokenizer

        load_tokenizer(cfg.tokenizer_model, cfg.tokenizer_type)  # a one-line error before any work

    from megaseg.data.default_data import default_data_dir_for, prepare_default_data

    directory = default_data_dir_for(cfg.default_data_dir, cfg.tokenizer_model)
    say = print if _is_rank0() else (lambda *_: None)
    data = None
    if _is_rank0():
        data = prepare_default_data(directory, tokenizer_model=cfg.tokenizer_model,
                                    log=lambda msg: say(f"default data: {msg}"), tokenizer_type=cfg.tokenizer_type)
    if dist.is_initialized():
        dist.barrier()
    if data is None:
        data = prepare_default_data(directory, tokenizer_model=cfg.tokenizer_model, log=lambda msg: None,
                                    tokenizer_type=cfg.tokenizer_type)
    return [data.data_prefix], str(data.tokenizer_model)


ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                       "kv_channels", "norm_epsilon", "rotary_base", "rope_scaling_type", "rope_scaling_factor",
                       "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position_embeddings",
                       "untie_embeddings_and_output_weights", "add_qkv_bias", "vocab_size")


def apply_pretrained(cfg: PretrainConfig):
    """(config with the pretrained checkpoint's architecture and tokenizer, its reference
    weights, its Hugging Face config fields).

    The architecture comes from the checkpoint: a flag left at its default takes the
    checkpoint's value, a flag set to another value is an error naming both. Segment
    settings and head plan are this run's (continued pretraining changes how the model is
    segmented, not its shape). The tokenizer is the checkpoint's (a sentencepiece
    ``tokenizer.model`` or a Hugging Face ``tokenizer.json``) unless one is given; either
    way its special ids must agree with the checkpoint's config.
    """
    from megaseg.checkpoint.formats import checkpoint_shape, read_model
    from megaseg.config import SegmentConfig
    from megaseg.data.tokenizer import load_tokenizer
    from megaseg.segment_options import head_plan_from

    path = cfg.pretrained_checkpoint
    layers, groups, _, _ = checkpoint_shape(path)
    plan = head_plan_from(cfg.head_plan_preset, layers, groups, cfg.long_range_layers, cfg.num_long_range_heads,
                          cfg.long_range_heads or None, cfg.head_plan_file)
    segment = SegmentConfig(cfg.segment_length, cfg.tail_length, cfg.retrieval_length, cfg.tbptt_k,
                            cfg.retrieval_group_reduce)
    source = read_model(path, segment=segment, head_plan=plan)
    m = source.config
    arch = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.intermediate_size,
                num_attention_heads=m.num_heads, num_query_groups=m.num_kv_heads, kv_channels=m.head_dim,
                norm_epsilon=m.rms_norm_eps, rotary_base=m.rope.theta, rope_scaling_type=m.rope.scaling_type,
                rope_scaling_factor=m.rope.factor, rope_low_freq_factor=m.rope.low_freq_factor,
                rope_high_freq_factor=m.rope.high_freq_factor,
                rope_original_max_position_embeddings=m.rope.original_max_position_embeddings,
                untie_embeddings_and_output_weights=not m.tie_word_embeddings, add_qkv_bias=m.qkv_bias,
                vocab_size=m.vocab_size)
    defaults = PretrainConfig.__dataclass_fields__
    for name in ARCHITECTURE_FIELDS:
        value, default = getattr(cfg, name), defaults[name].default
        if value != default and value != arch[name]:
            raise ConfigError(f"{name}={value!r} is invalid: the pretrained checkpoint {path} has {name}={arch[name]!r} "
                              "(leave the flag out to take the checkpoint's)")
    tokenizer = cfg.tokenizer_model or source.tokenizer
    if tokenizer is None:
        raise ConfigError(f"pretrained_checkpoint={path!r} has no tokenizer (tokenizer.model or tokenizer.json); "
                          "pass --tokenizer-model")
    check_special_ids(load_tokenizer(tokenizer, cfg.tokenizer_type), source.hf, m.vocab_size, path)
    values = {**cfg.to_dict(), **arch, "tokenizer_model": str(tokenizer)}
    return PretrainConfig(**values), source.state_dict, source.hf


def check_special_ids(tokenizer, hf: dict, model_vocab: int, path: str) -> None:
    """The tokenizer must be the model's: its vocabulary fits the embedding and its bos/eos/pad
    ids are those the checkpoint's config declares (an eos list, as Llama-3.1 has, must
    contain the tokenizer's eos). One line naming both sides otherwise."""
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(f"tokenizer_model={str(tokenizer.path)!r} is invalid: it has {tokenizer.vocab_size} tokens, "
                          f"the pretrained checkpoint {path} embeds {model_vocab}")
    ids = tokenizer.special_ids()
    for name in ("bos", "eos", "pad"):
        declared, mine = hf.get(f"{name}_token_id"), ids[name]
        if declared is None or mine is None and name == "pad":
            continue
        allowed = declared if isinstance(declared, list) else [declared]
        if mine not in allowed:
            raise ConfigError(
                f"tokenizer_model={str(tokenizer.path)!r} is invalid: its {name} id is {mine}, the pretrained "
                f"checkpoint {path} declares {name}_token_id={declared!r} (use the checkpoint's own tokenizer)")


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
            eod_mask_loss=cfg.eod_mask_loss,
            loss_mask_data=cfg.loss_mask_data_path or None,
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
    from megaseg.checkpoint.training import locate_checkpoint
    from megaseg.ops import kernels
    from megaseg.training.precision import resolve_bf16
    from megaseg.training.setup import check_batch_sizes, check_optimizer_settings
    from megaseg.training.trainer import pretrain

    import torch

    if not torch.cuda.is_available():  # CPU training: no page faults for every large tensor
        from megaseg.cpu_memory import keep_freed_memory

        keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
    if cfg.context_parallel_size > 1:  # whole segments per rank: checked before the launch advice below
        from megaseg.parallel.context import ChunkLayout

        ChunkLayout(cfg.seq_length, cfg.segment_length, cfg.context_parallel_size)
    if layout > world:
        raise ConfigError(
            f"tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size = {layout} is invalid "
            f"with {world} process(es): launch {layout} (or a multiple), e.g. torchrun --nproc-per-node {layout} "
            "pretrain/pretrain_gpt.py ... or examples/pretrain_torchrun.sh")
    if world % layout:
        raise ConfigError(
            f"tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size = "
            f"{cfg.tensor_model_parallel_size} x {cfg.pipeline_model_parallel_size} x {cfg.context_parallel_size} "
            f"= {layout} is invalid: it must divide the world size {world}"
        )
    parallel.initialize_model_parallel(
        tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size, cp=cfg.context_parallel_size,
        seed=cfg.seed, timeout_s=cfg.distributed_timeout_minutes * 60,
    )
    try:
        # Everything that can be checked cheaply is checked before data preparation.
        check_batch_sizes(cfg)
        check_optimizer_settings(cfg)
        resolve_bf16(cfg.bf16)
        kernels.set_default(cfg.attention_kernel)
        if cfg.load:
            locate_checkpoint(cfg.load, allow_missing=cfg.load == cfg.save)
        initial_weights, base_hf = None, None
        if cfg.pretrained_checkpoint:
            cfg, initial_weights, base_hf = apply_pretrained(cfg)
        from megaseg.training.ownership import claim_save_directory

        claim_save_directory(cfg, say=lambda msg: None)  # another run's checkpoints: an error before any work
        blend, tokenizer_model = resolve_data(cfg)
        # The config written into checkpoints names the tokenizer actually used.
        cfg = PretrainConfig(**{**cfg.to_dict(), "tokenizer_model": tokenizer_model})
        tokenizer = validate_tokenizer(tokenizer_model, tokenizer_type=cfg.tokenizer_type)
        if cfg.vocab_size is not None and cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"vocab_size={cfg.vocab_size} is invalid: the tokenizer {tokenizer_model} has "
                f"{tokenizer.vocab_size} tokens"
            )
        model_config = cfg.model_config(tokenizer.vocab_size)
        train, valid = build_datasets(cfg, blend, tokenizer)
        pretrain(cfg, model_config, train, valid, initial_weights=initial_weights, hf_fields=base_hf)
    finally:
        parallel.destroy_model_parallel()
    return 0


def main(argv=None) -> int:
    from megaseg.data.preprocess import DataError
    from megaseg.data.tokenizer import TokenizerError

    # Bad flags, data, tokenizers and checkpoints are usage errors (exit 2, like argparse);
    # a run that diverged is a failure (exit 1).
    user_errors = (ConfigError, CheckpointError, DataError, TokenizerError)
    try:
        cfg = parse_args(argv, prog=PROG)
        return run(cfg)
    except user_errors as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last complete checkpoint is intact", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
