"""The files of a pretraining save directory: their names, the manifest check, and which
checkpoint a path names.

    <save>/latest_checkpointed_iteration.txt   (TRACKER) the newest complete iteration
    <save>/iter_0000100/                       (iteration_dir) one checkpoint
        common.pt, ...                         (COMMON_FILE) megatron-core's common state
        tokenizer.model                        (TOKENIZER_FILE) a sentencepiece tokenizer
        megaseg_manifest.json                  (MANIFEST) size and sha256 of every file

`find_checkpoint` resolves a save directory or an iter_* directory, `verify_checkpoint`
checks every file against the manifest, `locate_checkpoint` does both collectively.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

from megaseg.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "megaseg_manifest.json"
TOKENIZER_FILE = "tokenizer.model"
COMMON_FILE = "common.pt"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def process_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """A barrier over all ranks (nothing without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def sha256_file(path: str, sync: bool = False) -> str:
    """The file's sha256 (hex); ``sync``: fsync it as well."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def find_checkpoint(path: str, allow_missing: bool = False) -> str | None:
    """The iter_* directory to load from ``path`` (a save root or one iter_* directory).

    None when ``path`` is a directory with no tracker (nothing saved yet), or does not
    exist and ``allow_missing`` (a run that resumes from its own --save directory).
    Raises CheckpointError for a missing path or an unreadable tracker.
    """
    if not os.path.isdir(path):
        if allow_missing and not os.path.exists(path):
            return None
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, TRACKER)
    if not os.path.exists(tracker):
        return None
    try:
        with open(tracker) as fh:
            text = fh.read().strip()
        iteration = int(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{tracker}: not an iteration number; the tracker file is damaged") from None
    directory = iteration_dir(path, iteration)
    set_aside = os.path.join(path, f".{os.path.basename(directory)}.old")
    if not os.path.isdir(directory) and os.path.isdir(set_aside):
        return set_aside  # a re-save of this iteration was interrupted before its rename
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: missing, but {tracker} names iteration {iteration}")
    return directory


_verified: set[tuple[str, float]] = set()


def locate_checkpoint(path: str, allow_missing: bool = False) -> str | None:
    """`find_checkpoint` + `verify_checkpoint`, collectively: rank 0 reads the files and
    every rank raises the same CheckpointError. Verification is done once per process."""
    error, directory = None, None
    if process_rank() == 0:
        try:
            directory = find_checkpoint(path, allow_missing)
            if directory is not None:
                key = _verify_key(directory)
                if key not in _verified:
                    verify_checkpoint(directory)
                    _verified.add(key)
        except CheckpointError as exc:
            error = str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error, directory]
        dist.broadcast_object_list(box, src=0)
        error, directory = box
    if error is not None:
        raise CheckpointError(error)
    return directory


def _verify_key(directory: str) -> tuple[str, float]:
    manifest = os.path.join(directory, MANIFEST)
    return os.path.realpath(directory), os.path.getmtime(manifest) if os.path.exists(manifest) else -1.0


def verify_checkpoint(directory: str) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{manifest_path}: missing; the checkpoint is incomplete or not a megaseg checkpoint")
    try:
        with open(manifest_path) as fh:
            files = json.load(fh)["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path}: unreadable manifest; the checkpoint is damaged") from None
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: truncated or damaged ({size} bytes, expected {expected['bytes']})")
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 does not match the manifest)")


def is_training_checkpoint(path: str) -> bool:
    """A save directory (with its tracker) or one iter_* directory of a pretraining run."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, TRACKER))
        or (os.path.isfile(os.path.join(path, COMMON_FILE)) and os.path.isfile(os.path.join(path, "metadata.json")))
    )
