"""Which checkpoint format a path holds, and one way to read a model from any of them.

    training      a pretraining save directory (latest_checkpointed_iteration.txt) or one
                  of its iter_* directories, at any TP/PP layout
    megaseg       a megaseg model directory (megaseg_config.json; `convert_hf.py import`)
    hf-megaseg    a Hugging Face directory exported by megaseg (config.json with a
                  `megaseg` section and the modeling code)
    hf-llama      a plain Hugging Face Llama directory (segment settings must be given)

Every tool that takes a checkpoint (export, generate, evaluation, pretraining's
--pretrained-checkpoint) goes through `read_model`, so they all accept the same paths and
fail with the same one-line messages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.training_files import TOKENIZER_FILE, find_checkpoint, is_training_checkpoint
from megaseg.checkpoint.training_load import read_training_common, read_training_weights
from megaseg.checkpoint.weights import (
    build_model, check_weights, is_model_dir, read_hf_weights, read_json, read_model_dir,
)
from megaseg.config import ConfigError, HeadPlan, ModelConfig, SegmentConfig
from megaseg.hf_config import check_architecture, model_config_from_hf, passthrough_from_hf

TRAINING, MEGASEG, HF_MEGASEG, HF_LLAMA = "training", "megaseg", "hf-megaseg", "hf-llama"
FORMATS = (TRAINING, MEGASEG, HF_MEGASEG, HF_LLAMA)


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``; a CheckpointError saying what was found otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; pass a checkpoint directory "
                              "(a pretraining --save directory, one iter_* directory, or a model/HF directory)")
    if is_training_checkpoint(str(p)):
        return TRAINING
    if is_model_dir(p):
        return MEGASEG
    if (p / "config.json").is_file():
        return HF_MEGASEG if "megaseg" in read_json(p / "config.json") else HF_LLAMA
    if any(p.glob("iter_*")) or any(p.glob(".iter_*")):
        raise CheckpointError(f"{p}: holds iter_* directories but no latest_checkpointed_iteration.txt; "
                              "pass one iter_* directory")
    raise CheckpointError(
        f"{p}: no checkpoint found (looked for latest_checkpointed_iteration.txt or common.pt of a pretraining "
        "run, megaseg_config.json of a model directory, config.json of a Hugging Face directory)")


@dataclass
class ModelSource:
    """What a checkpoint path holds: the model config, the weights (reference names) and
    where its tokenizer is."""

    path: str
    format: str
    config: ModelConfig
    hf: dict[str, Any] = field(default_factory=dict)  # HF fields kept for export
    tokenizer: str | None = None  # a directory or a sentencepiece file, if the checkpoint has one
    state_dict: dict[str, torch.Tensor] | None = None
    iteration: int | None = None  # training checkpoints

    def build(self, dtype: torch.dtype | None = None):
        """The reference model holding these weights (eval mode)."""
        if self.state_dict is None:
            raise ValueError("read_model(..., weights=False) read no weights")
        return build_model(self.config, self.state_dict, dtype)


def read_model(path: str | os.PathLike, *, weights: bool = True, segment: SegmentConfig | None = None,
               head_plan: HeadPlan | None = None) -> ModelSource:
    """Config, weights and tokenizer location of any checkpoint format.

    ``segment``/``head_plan`` replace the checkpoint's own settings (a plain Llama directory
    has none, so it needs ``segment``). ``weights=False`` reads only the config.
    """
    fmt = detect_format(path)
    p = str(path)
    if fmt == TRAINING:
        if weights:
            sd, cfg, common = read_training_weights(p)
        else:
            directory, common = read_training_common(p)
            try:
                cfg = ModelConfig.from_dict(common["model_config"])
            except (ConfigError, TypeError) as exc:
                raise CheckpointError(f"{directory}: bad model config: {exc}") from None
            sd = None
        tokenizer = training_tokenizer(p, common)
        # The run's tokenizer's special ids, under the base model's fields (continued
        # pretraining; checked against the tokenizer when the run started, and an eos
        # list such as Llama-3.1's stays a list).
        hf = {**special_token_ids(tokenizer), **(common.get("hf") or {})}
        src = ModelSource(p, fmt, _override(cfg, segment, head_plan, p), hf, tokenizer, sd, int(common["iteration"]))
    elif fmt == MEGASEG:
        sd, cfg, hf = read_model_dir(p, weights=weights)
        src = ModelSource(p, fmt, _override(cfg, segment, head_plan, p), hf, p, sd)
    else:
        hf_cfg = read_json(Path(p) / "config.json")
        cfg = model_config_from_hf(hf_cfg, segment, head_plan, source=p)
        sd = check_weights(read_hf_weights(p), cfg, p) if weights else None
        src = ModelSource(p, fmt, cfg, passthrough_from_hf(hf_cfg), p, sd)
    if src.tokenizer is not None and not _has_tokenizer(src.tokenizer):
        src.tokenizer = None
    return src


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               segment: SegmentConfig | None = None, head_plan: HeadPlan | None = None):
    """(reference model, kept HF fields) from any checkpoint format."""
    src = read_model(path, segment=segment, head_plan=head_plan)
    return src.build(dtype), src.hf


def _override(cfg: ModelConfig, segment, head_plan, source) -> ModelConfig:
    if segment is None and head_plan is None:
        return cfg
    try:
        return cfg.replace(segment=segment or cfg.segment, head_plan=head_plan or cfg.head_plan)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    if p.is_file():
        return True
    return any((p / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))


def training_tokenizer(path: str, common: Mapping[str, Any]) -> str | None:
    """The tokenizer a training checkpoint carries (copied in at save), else the file its run
    named, if it still exists."""
    directory = find_checkpoint(path)
    if directory and os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    if directory and os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        return os.path.join(directory, TOKENIZER_FILE)
    named = (common.get("args") or {}).get("tokenizer_model")
    return named if named and os.path.exists(named) else None


def special_token_ids(tokenizer: str | None) -> dict[str, Any]:
    """HF config fields of a tokenizer: its bos/eos/pad ids (None when undefined)."""
    if tokenizer is None:
        return {}
    if not tokenizer.endswith(".model"):
        from megaseg.data.tokenizer import HuggingFaceTokenizer, TokenizerError

        try:
            ids = HuggingFaceTokenizer(tokenizer).special_ids()
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
        return {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(tokenizer)
    except (OSError, RuntimeError):
        raise CheckpointError(f"{tokenizer}: not a readable sentencepiece model") from None
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def checkpoint_shape(path: str | os.PathLike) -> tuple[int, int, SegmentConfig | None, HeadPlan | None]:
    """(layers, KV groups, segment settings, head plan) recorded in a checkpoint, read without
    its weights; the settings are None for a plain Llama directory."""
    if detect_format(path) == HF_LLAMA:
        hf = read_json(Path(path) / "config.json")
        check_architecture(hf, str(path))
        layers = int(hf.get("num_hidden_layers") or 0)
        groups = int(hf.get("num_key_value_heads") or hf.get("num_attention_heads") or 0)
        if layers <= 0 or groups <= 0:
            raise CheckpointError(f"{path}: config.json needs num_hidden_layers and num_attention_heads")
        return layers, groups, None, None
    cfg = read_model(path, weights=False).config
    return cfg.num_layers, cfg.num_kv_heads, cfg.segment, cfg.head_plan
