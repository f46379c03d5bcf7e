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
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megaseg.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "megaseg_manifest.json"
TOKENIZER_FILE = "tokenizer.model"
COMMON_FILE = "common.pt"
FORMAT_VERSION = 1
_CHUNK = 1 << 22
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class LoadedCheckpoint:
    path: str  # the iter_* directory
    iteration: int
    consumed_train_samples: int
    args: dict[str, Any]
    rng_restored: bool  # False when not asked for, or saved under another TP/PP layout
    hf: dict[str, Any] | None = None  # the base model's Hugging Face config fields, if any


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


def _sha256(path: str, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


# ---- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA and megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        state["numpy"] = None
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        import numpy as np

        np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def parallel_layout() -> dict[str, int]:
    """The model-parallel layout RNG states are tied to (they are per TP/PP rank)."""
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
    }


def full_layout() -> dict[str, int]:
    """Every parallel size of the saving run (for inspection; loading reshards any of them)."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _sharded_rng(state):
    """RNG states as a ShardedObject: one per (pipeline, tensor) rank, replicated over DP."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


# ---- state dicts ------------------------------------------------------------------------------
def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors before a load.

    Without Apex or Transformer Engine its state dict reads the step count from the torch
    Adam state, which a fresh optimizer does not have yet; megatron-core's own dummy step
    (zero gradients) allocates it. Every value it touches is then replaced by the load.
    """
    if hasattr(optimizer, "allocate_state"):  # DeepSpeed ZeRO
        optimizer.allocate_state()
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            opt._init_optimizer_states_with_dummy_values()


def _sharded_state_dict(model, optimizer, scheduler, *, is_loading: bool, with_optimizer: bool, with_rng: bool):
    from megatron.core.utils import unwrap_model

    model_sd = unwrap_model(model).sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if with_optimizer and optimizer is not None:
        if is_loading:
            _allocate_optimizer_state(optimizer)
        # The distributed optimizer's state is saved in model space (one tensor per parameter,
        # like the replicated optimizer's), so it reloads at any DP/TP/PP size; the replicated
        # optimizer ignores the metadata.
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=OPTIMIZER_METADATA)
    if with_optimizer and scheduler is not None and not is_loading:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _sharded_rng(rng_state() if not is_loading else None)
    return sd


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
) -> str:
    """Save everything needed to resume at ``iteration``; returns the iter_* directory.

    Collective: every rank calls it. ``model`` may be wrapped (DDP); ``args`` and
    ``model_config`` must be plain data (they go into common.pt and are compared on load).
    ``tokenizer_model`` (a sentencepiece file, or a directory with a Hugging Face
    tokenizer) is copied in, so exports and generation need nothing from the training
    run's data directory. ``hf`` (the base model's HF config fields, for continued
    pretraining) is kept so that an export restores them.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = os.path.join(root, f".iter_{iteration:07d}.tmp")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        _clean_interrupted(root)
        os.makedirs(tmp)
    _barrier()

    sd = _sharded_state_dict(model, optimizer, scheduler, is_loading=False, with_optimizer=True, with_rng=True)
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
    dist_checkpointing.save(sd, tmp)
    _barrier()
    if _rank() == 0:
        if tokenizer_model and os.path.isfile(tokenizer_model) and not tokenizer_model.endswith(".json"):
            shutil.copyfile(tokenizer_model, os.path.join(tmp, TOKENIZER_FILE))
        elif tokenizer_model and os.path.exists(tokenizer_model):
            from megaseg.checkpoint.weights import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_model, tmp)
        _write_manifest(tmp)
        _commit(tmp, final, root, iteration)
    _barrier()
    return final


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
            files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path, sync=True)}
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


# ---- finding and verifying ------------------------------------------------------------------
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
    if _rank() == 0:
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
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 does not match the manifest)")


def _config_mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_mismatch(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            diffs.append(f"{prefix}{key}: checkpoint {_plain(a)!r}, this run {_plain(b)!r}")
    return diffs


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---- loading -----------------------------------------------------------------------------------
def load_training_checkpoint(
    path: str,
    model,
    optimizer=None,
    scheduler=None,
    *,
    model_config: dict[str, Any],
    load_optimizer: bool = True,
    load_rng: bool = True,
    allow_missing: bool = False,
) -> LoadedCheckpoint | None:
    """Restore model (and optimizer, scheduler, RNG) from ``path``; None if nothing saved yet.

    ``path`` is a save directory (its tracker names the checkpoint) or one iter_* directory;
    the checkpoint is verified against its manifest (`locate_checkpoint`) first.

    Weights and optimizer state reshard to this run's tensor-parallel size (dist_checkpointing);
    RNG states are per rank, so they are restored only under the layout they were saved with.

    Collective. Raises CheckpointError (one line, names the file) for a damaged checkpoint
    or one whose model configuration differs from ``model_config``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    directory = locate_checkpoint(path, allow_missing)
    if directory is None:
        return None
    common_path = os.path.join(directory, "common.pt")
    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{common_path}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(common, dict) or "model_config" not in common or "iteration" not in common:
        raise CheckpointError(f"{common_path}: not a megaseg training checkpoint (no model_config/iteration)")
    diffs = _config_mismatch(common["model_config"], model_config)
    if diffs:
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise CheckpointError(f"{common_path}: checkpoint is for a different model: {'; '.join(diffs[:4])}{more}")

    load_rng = load_rng and common.get("parallel_layout") == parallel_layout()
    sd = _sharded_state_dict(model, optimizer, scheduler, is_loading=True,
                             with_optimizer=load_optimizer, with_rng=load_rng)
    try:
        state = dist_checkpointing.load(sd, directory)
    except (CheckpointingException, CheckpointException, RuntimeError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{directory}: cannot be loaded into this model ({_describe(exc)})") from None

    from megatron.core.utils import unwrap_model

    unwrap_model(model).load_state_dict(state["model"], strict=True)
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if load_optimizer and scheduler is not None and "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        set_rng_state(state["rng_state"])
    return LoadedCheckpoint(
        path=directory,
        iteration=int(state["iteration"]),
        consumed_train_samples=int(state["consumed_train_samples"]),
        args=dict(state.get("args") or {}),
        rng_restored=load_rng,
        hf=common.get("hf"),
    )


def _describe(exc: BaseException) -> str:
    """One line for an exception; for torch's per-rank CheckpointException, rank 0's cause."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = sorted(failures.items())[0]
        cause = getattr(cause, "exc", cause)  # a wrapped remote exception keeps the original here
        return f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# ---- reading without a run ----------------------------------------------------------------------
def is_training_checkpoint(path: str) -> bool:
    """A save directory (with its tracker) or one iter_* directory of a pretraining run."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, TRACKER))
        or (os.path.isfile(os.path.join(path, COMMON_FILE)) and os.path.isfile(os.path.join(path, "metadata.json")))
    )


def read_training_common(path: str) -> tuple[str, dict[str, Any]]:
    """(iter_* directory, its common state: iteration, args, model_config, ...) of the
    checkpoint ``path`` names, verified against the manifest. One process, no tensors."""
    directory = find_checkpoint(path)
    if directory is None:
        raise CheckpointError(f"{path}: {TRACKER} is missing; no checkpoint was saved here yet")
    verify_checkpoint(directory)
    common_path = os.path.join(directory, COMMON_FILE)
    try:
        common = torch.load(common_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{common_path}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(common, dict) or "model_config" not in common or "iteration" not in common:
        raise CheckpointError(f"{common_path}: not a megaseg training checkpoint (no model_config/iteration)")
    return directory, common


def read_training_weights(path: str):
    """(reference state dict with HF Llama names, ModelConfig, common state) of a pretraining
    checkpoint saved at any TP/PP layout; ``path`` is a save directory or an iter_* directory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megaseg.config import ConfigError, ModelConfig
    from megaseg.megatron.convert import ConversionError, megatron_to_reference

    directory, common = read_training_common(path)
    try:
        cfg = ModelConfig.from_dict(common["model_config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{os.path.join(directory, COMMON_FILE)}: bad model config: {exc}") from None
    try:
        metadata = FileSystemReader(directory).read_metadata()
        stacked = {
            key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and not key.startswith(("optimizer", "rng_state"))
        }
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(stacked, checkpoint_id=directory, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign .distcp/.metadata file
        raise CheckpointError(f"{directory}: model tensors unreadable ({_describe(exc)})") from None
    megatron_sd = {}
    for key, tensor in stacked.items():
        if key.startswith("decoder.layers."):  # [num_layers, ...] -> one tensor per layer
            if tensor.shape[0] != cfg.num_layers:
                raise CheckpointError(f"{directory}: {key} holds {tensor.shape[0]} layers, the config {cfg.num_layers}")
            rest = key[len("decoder.layers."):]
            for i in range(cfg.num_layers):
                megatron_sd[f"decoder.layers.{i}.{rest}"] = tensor[i]
        else:
            megatron_sd[key] = tensor
    try:
        return megatron_to_reference([megatron_sd], cfg), cfg, common
    except ConversionError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
