"""Whose checkpoints a save directory holds: a run resumes its own and never takes over another's.

When ``--save`` already holds checkpoints and ``--load`` is not given, the run that wrote them
is compared with this one on the settings that make a run what it is (model, segments,
data, batch, seed; not its length, logging or layout): the same run resumes (one line,
like torchtitan's auto-resume), another one is a one-line error naming the settings that
differ and the ways out. ``--overwrite-checkpoints`` starts over instead; the old
checkpoints are removed only once this run's first checkpoint is complete, so a crash
before that loses nothing.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

from megaseg.checkpoint.errors import CheckpointError
from megaseg.config import ConfigError

# PretrainConfig fields that define a run: a checkpoint written with other values is
# another run's. Length (train_iters), schedule, logging, validation and the parallel
# layout may change between a run and its resume.
RUN_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "norm_epsilon", "rotary_base", "rope_scaling_type", "rope_scaling_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_position_embeddings", "untie_embeddings_and_output_weights",
    "add_qkv_bias", "vocab_size", "segment_length", "tail_length", "retrieval_length", "tbptt_k",
    "retrieval_group_reduce", "head_plan_preset", "long_range_layers", "num_long_range_heads", "long_range_heads",
    "head_plan_file", "seq_length", "global_batch_size", "data_path", "split", "tokenizer_model", "seed",
    "reset_attention_mask", "reset_position_ids", "eod_mask_loss", "optimizer", "pretrained_checkpoint",
)


def differences(saved_args: dict, cfg) -> list[str]:
    """``name saved -> this run's`` for every run-defining setting that differs."""
    current = cfg.to_dict()
    # No tokenizer named yet: the run takes its data's (checked once the data is resolved).
    skip = {"tokenizer_model"} if current.get("tokenizer_model") is None else set()
    return [f"{name} {saved_args[name]!r} -> {current[name]!r}" for name in RUN_FIELDS
            if name in saved_args and name in current and name not in skip and saved_args[name] != current[name]]


def claim_save_directory(cfg, say=print):
    """``cfg`` itself, or ``cfg`` with ``load = save`` when ``save`` holds this run's
    checkpoints; ConfigError when it holds another run's."""
    from megaseg.checkpoint.training import TRACKER, read_training_common

    if not cfg.save or cfg.load or cfg.overwrite_checkpoints:
        return cfg
    if not os.path.isfile(os.path.join(cfg.save, TRACKER)):
        return cfg
    try:
        directory, common = read_training_common(cfg.save)
    except CheckpointError as exc:
        raise ConfigError(f"save={cfg.save!r} is invalid: it holds a checkpoint this run cannot read ({exc}); pass "
                          "another --save, or --overwrite-checkpoints to start over") from None
    diffs = differences(common.get("args") or {}, cfg)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(
            f"save={cfg.save!r} is invalid: it holds the checkpoints of another run (iteration {common['iteration']}; "
            f"{shown}); pass --load {cfg.save} to resume that run, another --save for this one, or "
            "--overwrite-checkpoints to start over and replace them")
    say(f"{cfg.save} holds this run's checkpoint at iteration {common['iteration']}: resuming from it "
        "(--overwrite-checkpoints to start over)")
    return dataclasses.replace(cfg, load=cfg.save)


def prune_checkpoints(root: str, keep_last_n: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last_n`` iter_* checkpoints of ``root``, never
    ``protect`` (the checkpoint a run resumed from). Called after a save is complete (its
    tracker written), so a crash here loses nothing that the tracker names. Rank 0's job."""
    found = sorted((int(name[len("iter_"):]), name) for name in os.listdir(root)
                   if name.startswith("iter_") and name[len("iter_"):].isdigit() and os.path.isdir(os.path.join(root, name)))
    kept = {name for _, name in found[-keep_last_n:]} if keep_last_n else {name for _, name in found}
    removed = []
    for _, name in found:
        path = os.path.join(root, name)
        if name in kept or (protect and os.path.realpath(path) == os.path.realpath(protect)):
            continue
        shutil.rmtree(path)
        removed.append(name)
    return removed


def remove_other_checkpoints(root: str, keep: str) -> list[str]:
    """Delete every iter_* checkpoint of ``root`` but ``keep`` (rank 0's job; the tracker
    already names ``keep``). Returns the removed directory names."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith("iter_") and os.path.isdir(path) and os.path.realpath(path) != os.path.realpath(keep):
            shutil.rmtree(path)
            removed.append(name)
    return removed
