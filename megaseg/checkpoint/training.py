"""Pretraining checkpoints: megatron-core dist_checkpointing, written atomically.

Layout of a save directory (Megatron's names):

    <save>/latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint
    <save>/iter_0000100/                       one dist_checkpointing checkpoint
        metadata.json, common.pt, .metadata, __*_*.distcp   (megatron-core)
        tokenizer.model                        the run's sentencepiece tokenizer, or
        tokenizer.json, tokenizer_config.json  its Hugging Face tokenizer files
        megaseg_manifest.json                  size and sha256 of every file above

A checkpoint holds the model, the optimizer, the LR scheduler, every rank's RNG states, the
data position (consumed samples), the run's whole `PretrainConfig` and `ModelConfig`, and
the tokenizer, so it is enough to resume, export or generate from. It is written to a
hidden temporary directory, its manifest is written last, and only then is it renamed into
place and the tracker replaced (each with an atomic rename): a crash at any point leaves
the previous checkpoint and the tracker that names it untouched.

Loading verifies the manifest first, so a truncated or damaged file, and a checkpoint of
a different model, fail with a one-line `CheckpointError` naming the file.

`read_training_weights` reads the model weights of a checkpoint saved at any
tensor/pipeline-parallel layout in one process, without process groups or megatron model
objects: dist_checkpointing stores every tensor in its global (unsharded) shape, with the
layers stacked along a leading axis.

This module saves checkpoints (`save_training_checkpoint`) and is the entry point for the
rest, whose public names it re-exports:

    training_files.py  file names, the manifest check, finding and locating a checkpoint
    training_state.py  the sharded state dict (model, optimizer, scheduler, RNG), RNG states
    training_load.py   loading into a run; reading common state and weights without one
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.training_files import (
    COMMON_FILE,
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILE,
    TRACKER,
    barrier,
    find_checkpoint,
    is_training_checkpoint,
    iteration_dir,
    locate_checkpoint,
    process_rank,
    sha256_file,
    verify_checkpoint,
)
from megaseg.checkpoint.training_load import (
    LoadedCheckpoint,
    load_training_checkpoint,
    read_training_common,
    read_training_weights,
)
from megaseg.checkpoint.training_state import (
    OPTIMIZER_METADATA,
    full_layout,
    parallel_layout,
    rng_state,
    set_rng_state,
    sharded_state_dict,
)

__all__ = [
    "COMMON_FILE", "FORMAT_VERSION", "MANIFEST", "OPTIMIZER_METADATA", "TOKENIZER_FILE", "TRACKER", "CheckpointError",
    "LoadedCheckpoint", "find_checkpoint", "full_layout", "is_training_checkpoint", "iteration_dir",
    "load_training_checkpoint", "locate_checkpoint", "parallel_layout", "read_training_common",
    "read_training_weights", "rng_state", "save_training_checkpoint", "set_rng_state", "verify_checkpoint",
]


def save_training_checkpoint(
    root: str,
    iteration: int,
    model,
    optimizer,
    scheduler,
    *,
    consumed_train_samples: int,
    args: dict[str, Any],
    model_config: dict[str, Any],
    tokenizer_model: str | None = None,
    hf: dict[str, Any] | None = None,
    async_queue=None,
    on_commit=None,
) -> str:
    """Save everything needed to resume at ``iteration``; returns the iter_* directory.

    Collective: every rank calls it. ``model`` may be wrapped (DDP); ``args`` and
    ``model_config`` must be plain data (they go into common.pt and are compared on load).
    ``tokenizer_model`` (a sentencepiece file, or a directory with a Hugging Face
    tokenizer) is copied in, so exports and generation need nothing from the training
    run's data directory. ``hf`` (the base model's HF config fields, for continued
    pretraining) is kept so that an export restores them.

    With ``async_queue`` (megatron-core's ``AsyncCallsQueue``) the sharded files are
    written by a background process and this returns once it has started; the queue's
    finalization (``maybe_finalize_async_calls``, collective) writes the manifest, renames
    the checkpoint into place, moves the tracker and calls ``on_commit(path)``; until then
    the previous checkpoint is the one to resume. Without it all of that happens here.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = os.path.join(root, f".iter_{iteration:07d}.tmp")
    if process_rank() == 0:
        os.makedirs(root, exist_ok=True)
        _clean_interrupted(root)
        os.makedirs(tmp)
    barrier()

    sd = _checkpoint_state_dict(model, optimizer, scheduler, iteration, consumed_train_samples, args,
                                model_config, hf)
    finish = functools.partial(_finish, tmp, final, root, iteration, tokenizer_model, on_commit)
    if async_queue is None:
        dist_checkpointing.save(sd, tmp)
        finish()
    else:
        request = dist_checkpointing.save(sd, tmp, async_sharded_save=True)
        request.add_finalize_fn(finish)
        async_queue.schedule_async_request(request)
    return final


def _checkpoint_state_dict(model, optimizer, scheduler, iteration: int, consumed_train_samples: int,
                           args: dict[str, Any], model_config: dict[str, Any], hf: dict[str, Any] | None) -> dict:
    """The sharded state dict of a save (model, optimizer, scheduler, RNG) with the common
    state: format version, iteration, data position, the run's configs and layouts, ``hf``."""
    sd = sharded_state_dict(model, optimizer, scheduler, is_loading=False, with_optimizer=True, with_rng=True)
    sd.update(
        checkpoint_version=FORMAT_VERSION,
        iteration=iteration,
        consumed_train_samples=consumed_train_samples,
        args=args,
        model_config=model_config,
        parallel_layout=parallel_layout(),
        layout=full_layout(),
    )
    if hf:
        sd["hf"] = dict(hf)
    return sd


def _finish(tmp: str, final: str, root: str, iteration: int, tokenizer_model: str | None, on_commit) -> None:
    """Complete a save once its sharded files are written (collective): rank 0 copies the
    tokenizer in, writes the manifest and commits ``tmp`` as ``final``; then every rank
    calls ``on_commit(final)``."""
    barrier()
    if process_rank() == 0:
        if tokenizer_model and os.path.isfile(tokenizer_model) and not tokenizer_model.endswith(".json"):
            shutil.copyfile(tokenizer_model, os.path.join(tmp, TOKENIZER_FILE))
        elif tokenizer_model and os.path.exists(tokenizer_model):
            from megaseg.checkpoint.weights import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_model, tmp)
        _write_manifest(tmp)
        _commit(tmp, final, root, iteration)
    barrier()
    if on_commit is not None:
        on_commit(final)


def _clean_interrupted(root: str) -> None:
    """Remove what an interrupted save left behind; put back a set-aside complete checkpoint."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".iter_") and name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".iter_") and name.endswith(".old"):
            final = os.path.join(root, name[1 : -len(".old")])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)


def _write_manifest(directory: str) -> None:
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name != MANIFEST:
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path, sync=True)}
    _write_atomic(os.path.join(directory, MANIFEST), json.dumps({"version": FORMAT_VERSION, "files": files}, indent=1))


def _commit(tmp: str, final: str, root: str, iteration: int) -> None:
    """Rename the finished checkpoint into place, then point the tracker at it."""
    old = None
    if os.path.exists(final):
        old = os.path.join(root, f".{os.path.basename(final)}.old")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")
