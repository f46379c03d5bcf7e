"""Hugging Face Llama <-> megaseg checkpoint conversion.

import: HF Llama directory -> megaseg checkpoint directory (segment settings and head plan
        chosen by the caller; weights are copied bit for bit, optionally cast).
export: megaseg checkpoint directory -> HF directory with Llama-layout safetensors, a
        config.json carrying the segment settings, tokenizer files and the modeling code
        (``modeling_megaseg.py``, registered through ``auto_map``) that runs the segmented
        operator. With ``segmented=False`` the directory is a plain Llama checkpoint.

The reference model uses HF Llama parameter names, so the weight mapping is the identity.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import HF_LLAMA, read_model
from megaseg.checkpoint.weights import (
    check_weights, copy_tokenizer_files, read_hf_weights, read_json, save_model_dir,
)
from megaseg.hf_config import (
    FAMILIES, REMOTE_CODE_MODULE, check_window, hf_config_dict, model_config_from_hf, passthrough_from_hf,
)
from megaseg.inference.tokenizer import model_adds_bos

MODELING_FILE = Path(__file__).with_name(f"{REMOTE_CODE_MODULE}.py")


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    d = Path(hf_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    return read_json(d / "config.json")


def import_hf_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    segment: SegmentConfig | None,
    head_plan: HeadPlan | None,
    dtype: torch.dtype | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
) -> ModelConfig:
    """Convert a HF Llama directory into a megaseg checkpoint directory; returns its config.

    ``tp_size``/``pp_size`` > 1 store megatron-layout shards per rank (see checkpoint.py).
    """
    hf_cfg = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_cfg, segment, head_plan, source=str(hf_dir))
    sd = check_weights(read_hf_weights(hf_dir), cfg, str(hf_dir))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_model_dir(out_dir, sd, cfg, hf=passthrough_from_hf(hf_cfg), tokenizer_from=hf_dir,
                    tp_size=tp_size, pp_size=pp_size)
    return cfg


def export_hf_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    segmented: bool = True,
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
    segment: SegmentConfig | None = None,
    head_plan: HeadPlan | None = None,
) -> ModelConfig:
    """Write a HF directory from any checkpoint `read_model` reads: a pretraining checkpoint
    (save directory or iter_* directory, any TP/PP layout) or a megaseg model directory.
    Returns its config.

    ``segment``/``head_plan`` replace the checkpoint's settings (e.g. full attention or no
    retrieval); the exported config.json then records the source's own settings under
    ``megaseg.overridden_from`` ({"segment": ..., "head_plan": ...}).
    A pretraining checkpoint's tokenizer is written with ``add_bos_token: false``: its
    training samples had no BOS (`megaseg.inference.tokenizer.model_adds_bos`).
    """
    overridden = segment is not None or head_plan is not None
    src = read_model(src_dir, segment=segment, head_plan=head_plan)
    original = None
    if overridden and src.format != HF_LLAMA:
        original = read_model(src_dir, weights=False).config
        check_sliding_window(src, str(src_dir))
    sd = src.state_dict
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    write_hf_directory(out_dir, sd, src.config, src.hf, segmented)
    if original is not None:
        record_overrides(out_dir, original)
    eod = document_eod_of(src)
    if eod is not None:
        _update_megaseg_section(out_dir, document_eod=eod)
    tokenizer = tokenizer if tokenizer is not None else src.tokenizer
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, out_dir)
        write_tokenizer_config(out_dir, src.hf, add_bos=model_adds_bos(src))
    return src.config


def check_sliding_window(src, source: str) -> None:
    """Overridden settings of a model with a sliding window must stay inside it (an HF
    directory is checked when read; a megaseg or training checkpoint here): CheckpointError."""
    family = FAMILIES.get((src.hf or {}).get("model_type") or "llama")
    if family is not None:
        check_window(src.hf, family, src.config.segment, source)


def document_eod_of(src) -> int | None:
    """The EOD after which a model's state restarts (docs/semantics.md §8), or None: set for
    a pretraining run trained with --reset-attention-mask (its tokenizer's eod) and kept by
    its exports (``megaseg.document_eod`` in config.json)."""
    from megaseg.checkpoint.formats import TRAINING

    if src.format == TRAINING:
        from megaseg.checkpoint.training_load import read_training_common
        from megaseg.data.tokenizer import load_tokenizer

        args = read_training_common(src.path)[1].get("args") or {}
        if not args.get("reset_attention_mask") or src.tokenizer is None:
            return None
        return int(load_tokenizer(src.tokenizer).eod)
    config = Path(src.path) / "config.json"
    if config.is_file():
        eod = (json.loads(config.read_text()).get("megaseg") or {}).get("document_eod")
        return None if eod is None else int(eod)
    return None


def _update_megaseg_section(out_dir: str | os.PathLike, **fields) -> None:
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config["megaseg"].update(fields)
    path.write_text(json.dumps(config, indent=2) + "\n")


def record_overrides(out_dir: str | os.PathLike, original: ModelConfig) -> None:
    """Add ``overridden_from`` (the source checkpoint's segment settings and head plan) to
    the ``megaseg`` section of an exported config.json."""
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config["megaseg"]["overridden_from"] = {"segment": dataclasses.asdict(original.segment),
                                            "head_plan": original.head_plan.to_list()}
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_tokenizer_config(out_dir: str | os.PathLike, hf: dict | None = None, add_bos: bool | None = None) -> None:
    """tokenizer_config.json naming transformers' Llama tokenizer class for a sentencepiece
    ``tokenizer.model`` (kept when the source brought its own).

    ``add_bos``: whether the model's inputs start with BOS; None keeps the source's setting
    (a sentencepiece tokenizer without a config adds BOS, as Llama's does). False is also
    written into a tokenizer_config.json the source brought.
    """
    out = Path(out_dir)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        if add_bos is not None:
            try:
                config = json.loads(cfg_path.read_text())
            except ValueError:
                raise CheckpointError(f"{cfg_path}: not valid JSON") from None
            if config.get("add_bos_token") != add_bos:
                config["add_bos_token"] = add_bos
                cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        return
    if not (out / "tokenizer.model").is_file():
        return
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(out / "tokenizer.model"))

    def piece(i):
        return sp.IdToPiece(i) if i >= 0 else None

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "add_bos_token": True if add_bos is None else add_bos,
        "add_eos_token": False,
        "legacy": False,
        # Whether sentencepiece prepends "▁" to the text (megaseg's own tokenizers do not).
        "add_prefix_space": sp.EncodeAsPieces("a")[0].startswith("\u2581"),
        "model_max_length": int((hf or {}).get("max_position_embeddings") or 1_000_000_000),
    }
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")


def _check_export_dir(out: Path) -> None:
    """Only an empty directory or a previous megaseg export may be written over."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.index.json") for p in sorted(out.glob(pattern))]
    if not weights:
        return
    try:
        previous = "megaseg" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        previous = False
    if not previous or any(p.name != "model.safetensors" for p in weights):
        raise CheckpointError(f"{out}: already holds weights ({weights[0].name}); choose an empty or new directory")


def write_hf_directory(out_dir, state_dict, cfg: ModelConfig, hf: dict | None = None, segmented: bool = True) -> Path:
    """Weights, config.json, generation_config.json and (segmented) the modeling code."""
    out = Path(out_dir)
    sd = check_weights(state_dict, cfg, str(out))
    _check_export_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = hf_config_dict(cfg, segmented=segmented, passthrough=hf)
    some = next(iter(sd.values()))
    config["dtype"] = str(some.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    remote = out / MODELING_FILE.name
    if segmented:
        shutil.copyfile(MODELING_FILE, remote)
    elif remote.exists():
        remote.unlink()
    return out
