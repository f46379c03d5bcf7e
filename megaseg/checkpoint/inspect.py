"""Describe a checkpoint without building a model or loading its tensors.

`inspect_checkpoint(path)` reads only small files: a training checkpoint's common.pt
(iteration, data position, the run's config, layout) and .metadata (every tensor's global
shape), a model directory's or export's config and safetensors headers. With
``verify=True`` it also checks every file of a training checkpoint against its manifest
(which reads the files once to hash them) or every safetensors header of a directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import TRAINING, detect_format, read_model
from megaseg.checkpoint.training_files import COMMON_FILE, find_checkpoint, verify_checkpoint
from megaseg.config import MODES, ModelConfig

_MODE_LETTER = {"local": "L", "retrieval": "R", "segment": "S"}


def inspect_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint at ``path`` (any format)."""
    fmt = detect_format(path)
    info: dict[str, Any] = {"path": str(path), "format": fmt}
    integrity = "not checked"
    if fmt == TRAINING:
        directory = find_checkpoint(str(path))
        if directory is None:
            raise CheckpointError(f"{path}: latest_checkpointed_iteration.txt is missing; no checkpoint was saved here")
        if verify:
            try:
                verify_checkpoint(directory)
                integrity = "ok (every file matches megaseg_manifest.json)"
            except CheckpointError as exc:
                integrity = f"FAILED: {exc}"
        common = _read_common(directory)
        cfg = ModelConfig.from_dict(common["model_config"])
        args = dict(common.get("args") or {})
        info.update(
            directory=directory,
            iteration=int(common["iteration"]),
            consumed_train_samples=int(common.get("consumed_train_samples", 0)),
            layout=common.get("layout") or {**common.get("parallel_layout", {}), "data_parallel_size": None},
            tokenizer=os.path.isfile(os.path.join(directory, "tokenizer.model")),
            args=args,
            tensors=_distcp_shapes(directory),
        )
        info["has_optimizer_state"] = any(k.startswith("optimizer") for k in _distcp_keys(directory))
    else:
        source = read_model(path, weights=False)
        cfg = source.config
        shapes, integrity_error = _safetensors_shapes(Path(path))
        if verify:
            integrity = f"FAILED: {integrity_error}" if integrity_error else "ok (safetensors headers readable)"
        info.update(tensors=shapes, tokenizer=source.tokenizer is not None,
                    layout=_model_dir_layout(Path(path)))
    info["integrity"] = integrity
    info["model"] = cfg.to_dict()
    info["head_plan_table"] = plan_table(cfg)
    info["parameters"] = parameter_count(cfg)
    info["stored_elements"] = sum(_numel(s) for name, s in info["tensors"].items() if _is_weight(name))
    return info


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the model (unpadded vocabulary), from the config alone."""
    E, F, D, H, G, V = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                        cfg.vocab_size)
    per_layer = 2 * E + E * H * D + 2 * E * G * D + H * D * E + 3 * E * F
    return V * E * (1 if cfg.tie_word_embeddings else 2) + E + cfg.num_layers * per_layer


def _read_common(directory: str) -> dict:
    import torch

    try:
        return torch.load(os.path.join(directory, COMMON_FILE), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged common.pt
        raise CheckpointError(f"{os.path.join(directory, COMMON_FILE)}: unreadable ({type(exc).__name__})") from None


def _distcp_keys(directory: str) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return list(FileSystemReader(directory).read_metadata().state_dict_metadata)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{directory}/.metadata: unreadable ({type(exc).__name__})") from None


def _distcp_shapes(directory: str) -> dict[str, list[int]]:
    """Global shapes of the model tensors (layers stacked on the first axis)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(directory).read_metadata().state_dict_metadata
    return {k: list(m.size) for k, m in sorted(meta.items())
            if isinstance(m, TensorStorageMetadata) and not k.startswith(("optimizer", "rng_state"))}


def _safetensors_shapes(d: Path) -> tuple[dict[str, list[int]], str | None]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    files = sorted(d.glob("*.safetensors")) + sorted(d.glob("mp_rank_*/*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    prefix = f"{f.parent.name}/" if f.parent != d else ""
                    shapes[prefix + k] = list(fh.get_slice(k).get_shape())
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            return shapes, f"{f}: not a readable safetensors file ({type(exc).__name__})"
    return shapes, None


def _model_dir_layout(d: Path) -> dict[str, Any]:
    cfg = d / "megaseg_config.json"
    if cfg.is_file():
        parallel = json.loads(cfg.read_text()).get("parallel") or {"tp": 1, "pp": 1}
        return {"tensor_model_parallel_size": parallel.get("tp", 1), "pipeline_model_parallel_size": parallel.get("pp", 1)}
    return {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def _is_weight(name: str) -> bool:
    return "_extra_state" not in name and "/" not in name.split(".")[-1]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def plan_table(cfg: ModelConfig) -> list[str]:
    """The head plan as rows of letters: one row per layer, one column per KV group
    (L = local, R = retrieval, S = segment)."""
    groups = cfg.num_kv_heads
    width = max(2, len(str(groups - 1)))
    header = "layer " + " ".join(f"{g:>{width}}" for g in range(groups))
    rows = [header]
    for i, modes in enumerate(cfg.head_plan.modes):
        rows.append(f"{i:>5} " + " ".join(f"{_MODE_LETTER[m]:>{width}}" for m in modes))
    return rows


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report `tools/inspect_checkpoint.py` prints."""
    m = info["model"]
    seg = m["segment"]
    lines = [f"{info['path']}: {info['format']} checkpoint"]
    if "iteration" in info:
        lines.append(f"iteration {info['iteration']}, {info['consumed_train_samples']} samples consumed"
                     f"{', with optimizer state' if info.get('has_optimizer_state') else ''}")
    layout = info.get("layout") or {}
    names = (("TP", "tensor_model_parallel_size"), ("PP", "pipeline_model_parallel_size"),
             ("CP", "context_parallel_size"), ("DP", "data_parallel_size"))
    lines.append("layout: " + ", ".join(f"{short} {layout[key]}" for short, key in names if layout.get(key) is not None))
    lines.append(f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, ffn {m['intermediate_size']}, "
                 f"{m['num_heads']} heads / {m['num_kv_heads']} KV groups of dim {m['head_dim']}, vocab {m['vocab_size']}, "
                 f"{'tied' if m['tie_word_embeddings'] else 'untied'} embeddings, rope theta {m['rope']['theta']:g}"
                 + (f" ({m['rope']['scaling_type']} x{m['rope']['factor']:g})" if m["rope"]["scaling_type"] else ""))
    lines.append(f"segments: S={seg['segment_length']} M={seg['tail_length']} R={seg['retrieval_length']} "
                 f"K={seg['tbptt_k']}, retrieval group reduce {seg['retrieval_group_reduce']}")
    counts = {mode: sum(row.count(mode) for row in m["head_plan"]) for mode in MODES}
    lines.append("head plan (L local, R retrieval, S segment): "
                 + ", ".join(f"{n} {mode}" for mode, n in counts.items()))
    lines += ["  " + row for row in info["head_plan_table"]]
    lines.append(f"parameters: {info['parameters']:,}; stored: {info['stored_elements']:,} elements in "
                 f"{len(info['tensors'])} tensors"
                 + (" (megatron layout: layers stacked, vocabulary padded)" if info["format"] == TRAINING else ""))
    for name, shape in info["tensors"].items():
        lines.append(f"  {name} {shape}")
    lines.append(f"tokenizer: {'included' if info['tokenizer'] else 'none'}")
    lines.append(f"integrity: {info['integrity']}")
    return "\n".join(lines)
