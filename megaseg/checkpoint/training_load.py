"""Reading pretraining checkpoints: restoring one into a run (`load_training_checkpoint`,
collective), and reading its common state or model weights in one process without a run
(`read_training_common`, `read_training_weights`).

Both verify the manifest first, so a truncated or damaged file, and a checkpoint of a
different model, fail with a one-line `CheckpointError` naming the file.

`read_training_weights` reads the model weights of a checkpoint saved at any
tensor/pipeline-parallel layout without process groups or megatron model objects:
dist_checkpointing stores every tensor in its global (unsharded) shape, with the layers
stacked along a leading axis.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.training_files import (
    COMMON_FILE, TRACKER, find_checkpoint, locate_checkpoint, verify_checkpoint,
)
from megaseg.checkpoint.training_state import parallel_layout, set_rng_state, sharded_state_dict


@dataclass
class LoadedCheckpoint:
    path: str  # the iter_* directory
    iteration: int
    consumed_train_samples: int
    args: dict[str, Any]
    rng_restored: bool  # False when not asked for, or saved under another TP/PP layout
    hf: dict[str, Any] | None = None  # the base model's Hugging Face config fields, if any


# ---- into a run ---------------------------------------------------------------------------------
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
    directory = locate_checkpoint(path, allow_missing)
    if directory is None:
        return None
    common = _load_common(directory, model_config)
    load_rng = load_rng and common.get("parallel_layout") == parallel_layout()
    state = _load_state(directory, model, optimizer, scheduler, load_optimizer=load_optimizer, load_rng=load_rng)

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


def _load_common(directory: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's common state; CheckpointError when it is unreadable or its model
    configuration differs from ``model_config``."""
    from megatron.core import dist_checkpointing

    common_path = os.path.join(directory, "common.pt")
    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{common_path}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    _check_common(common, common_path)
    diffs = _config_mismatch(common["model_config"], model_config)
    if diffs:
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise CheckpointError(f"{common_path}: checkpoint is for a different model: {'; '.join(diffs[:4])}{more}")
    return common


def _load_state(directory: str, model, optimizer, scheduler, *, load_optimizer: bool, load_rng: bool) -> dict:
    """The sharded state (model, optimizer, RNG as asked) loaded from ``directory``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    sd = sharded_state_dict(model, optimizer, scheduler, is_loading=True,
                            with_optimizer=load_optimizer, with_rng=load_rng)
    try:
        return dist_checkpointing.load(sd, directory)
    except (CheckpointingException, CheckpointException, RuntimeError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{directory}: cannot be loaded into this model ({_describe(exc)})") from None


def _check_common(common, common_path: str) -> None:
    if not isinstance(common, dict) or "model_config" not in common or "iteration" not in common:
        raise CheckpointError(f"{common_path}: not a megaseg training checkpoint (no model_config/iteration)")


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


# ---- without a run ------------------------------------------------------------------------------
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
    _check_common(common, common_path)
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
