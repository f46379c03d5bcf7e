"""megaseg model directories and Hugging Face Llama weight files.

A megaseg model directory (written by `tools/convert_hf.py import`; pretraining writes
training checkpoints, see training.py) holds the reference model of one process:

    megaseg_config.json   {"format": "megaseg", "version": 1,
                           "model": ModelConfig.to_dict(), "hf": {fields kept for export}}
    model.safetensors     the reference state dict; names are HF Llama names
                          (lm_head.weight is omitted when embeddings are tied)
    tokenizer files       optional (tokenizer.model, tokenizer.json, ...), copied through

At tensor/pipeline parallel sizes tp x pp > 1 the weights are stored per rank instead, as
megatron-core GPTModel state dicts (``megaseg.megatron.convert`` mapping, TP slicing):

    mp_rank_{tp:02d}_{pp:03d}/model.safetensors
                          stage pp holds layers [pp*n, (pp+1)*n) renumbered from 0 (n =
                          layers / pp), the embedding on stage 0, the final norm and output
                          layer on the last stage; "parallel": {"tp": .., "pp": ..} in the config

Every problem a user can cause (missing file, missing or unexpected tensor, a config whose
shapes disagree with the weights) raises ``CheckpointError`` with a one-line message.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from megaseg.checkpoint.errors import CheckpointError
from megaseg.config import ConfigError, ModelConfig
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.ops.segmented_attention import SegmentedAttention

CONFIG_NAME = "megaseg_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "megaseg"
VERSION = 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Buffers old HF checkpoints stored; recomputed from the config, so they are dropped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is invalid: allowed {sorted(DTYPES)}")
    return DTYPES[name]


# ---- weights -------------------------------------------------------------------------------
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the reference model for ``cfg`` (nothing allocated)."""
    with torch.device("meta"):
        model = SegmentedLlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _shape_hint(name: str) -> str:
    if "q_proj" in name or "o_proj" in name:
        return "num_attention_heads, head_dim, hidden_size"
    if "k_proj" in name or "v_proj" in name:
        return "num_key_value_heads, head_dim, hidden_size"
    if "mlp" in name:
        return "intermediate_size, hidden_size"
    if "embed" in name or "lm_head" in name:
        return "vocab_size, hidden_size"
    return "hidden_size"


def check_weights(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The state dict the reference model loads, or CheckpointError naming the first problem."""
    want = expected_shapes(cfg)
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing = [k for k in want if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]}{more}")
    unexpected = sorted(k for k in sd if k not in want)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]}{more}; is it a Llama checkpoint?")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{source}: config does not match the weights: {k} has shape {list(sd[k].shape)}, "
                f"the config gives {list(shape)} (check {_shape_hint(k)})"
            )
    return {k: sd[k] for k in want}


def read_hf_weights(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory: safetensors or .bin, single file or sharded."""
    d = Path(hf_dir)
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = d / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (d / shard).is_file():
                    raise CheckpointError(f"{d}: shard {shard} listed in {index_name} is missing")
                sd.update(loader(d / shard))
            return sd
    if (d / "model.safetensors").is_file():
        return _load_safetensors(d / "model.safetensors")
    if (d / "pytorch_model.bin").is_file():
        return _load_bin(d / "pytorch_model.bin")
    raise CheckpointError(f"{d}: no weights found (model.safetensors, pytorch_model.bin, or a sharded index)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(e).__name__})") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return dict(sd)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


# ---- megaseg checkpoint directory ----------------------------------------------------------
def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_model_dir(out_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                    hf: Mapping[str, Any] | None = None, tokenizer_from: str | os.PathLike | None = None,
                    tp_size: int = 1, pp_size: int = 1) -> Path:
    """Write a megaseg checkpoint directory; the weights are checked against ``cfg`` first."""
    out = Path(out_dir)
    sd = check_weights(state_dict, cfg, str(out))
    _check_parallel(cfg, tp_size, pp_size)
    prepare_output_dir(out)
    if tp_size * pp_size == 1:
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        _save_sharded(out, sd, cfg, tp_size, pp_size)
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), "hf": dict(hf or {}),
            "parallel": {"tp": tp_size, "pp": pp_size}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


_FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.safetensors.index.json", "*.bin.index.json")


def prepare_output_dir(out: Path, replace: tuple[str, ...] = (WEIGHTS_NAME,)) -> None:
    """Create ``out``; a previous megaseg checkpoint's weights there are replaced, anything
    else that looks like weights is refused (so a source directory is never overwritten)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    ours = (out / CONFIG_NAME).is_file()
    stale = [p for p in out.glob("*.safetensors") if not (ours and p.name in replace)] if out.is_dir() else []
    stale += [p for pattern in _FOREIGN_WEIGHTS for p in out.glob(pattern)] if out.is_dir() else []
    if stale:
        raise CheckpointError(f"{out}: already holds weights ({stale[0].name}); choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    if ours:
        for shard in out.glob(f"mp_rank_*/{WEIGHTS_NAME}"):
            shard.unlink()
        for name in replace:
            (out / name).unlink(missing_ok=True)


def read_model_dir(path: str | os.PathLike, weights: bool = True):
    """(state dict, ModelConfig, kept HF fields) of a megaseg checkpoint directory.

    With ``weights=False`` only the config is read (the state dict is None).
    """
    d = Path(path)
    meta = read_json(d / CONFIG_NAME)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / CONFIG_NAME}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{d / CONFIG_NAME}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{d / CONFIG_NAME}: bad model config: {e}") from None
    if not weights:
        return None, cfg, dict(meta.get("hf") or {})
    parallel = meta.get("parallel") or {"tp": 1, "pp": 1}
    tp_size, pp_size = int(parallel.get("tp", 1)), int(parallel.get("pp", 1))
    if tp_size * pp_size == 1:
        if not (d / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{d}: no {WEIGHTS_NAME}")
        sd = _load_safetensors(d / WEIGHTS_NAME)
    else:
        sd = _read_sharded(d, cfg, tp_size, pp_size)
    return check_weights(sd, cfg, str(d)), cfg, dict(meta.get("hf") or {})


# ---- tensor/pipeline parallel shards -------------------------------------------------------
def _check_parallel(cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    for name, v in (("tp_size", tp_size), ("pp_size", pp_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r} is invalid: must be an integer >= 1")
    if cfg.num_layers % pp_size:
        raise ConfigError(f"pp_size={pp_size} is invalid: must divide num_layers={cfg.num_layers}")
    for name, v in (("num_kv_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size)):
        if v % tp_size:
            raise ConfigError(f"tp_size={tp_size} is invalid: must divide {name}={v}")


def _rank_dir(tp: int, pp: int) -> str:
    return f"mp_rank_{tp:02d}_{pp:03d}"


def _stage_of(name: str, per_stage: int, pp_size: int) -> tuple[int, str]:
    """(pipeline stage, name with the stage-local layer number) of a megatron weight."""
    if name.startswith("decoder.layers."):
        layer, rest = name[len("decoder.layers."):].split(".", 1)
        stage, local = divmod(int(layer), per_stage)
        return stage, f"decoder.layers.{local}.{rest}"
    if name.startswith("embedding."):
        return 0, name
    return pp_size - 1, name  # final norm, output layer


def _save_sharded(out: Path, sd, cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    from megaseg.megatron.convert import reference_to_megatron

    per_stage = cfg.num_layers // pp_size
    for tp in range(tp_size):
        full = reference_to_megatron(sd, cfg, tp, tp_size)
        stages: list[dict[str, torch.Tensor]] = [{} for _ in range(pp_size)]
        for name, t in full.items():
            if t is not None:  # _extra_state placeholders
                stage, local = _stage_of(name, per_stage, pp_size)
                stages[stage][local] = t.contiguous()
        for pp, stage_sd in enumerate(stages):
            (out / _rank_dir(tp, pp)).mkdir(exist_ok=True)
            save_file(stage_sd, str(out / _rank_dir(tp, pp) / WEIGHTS_NAME), metadata={"format": "pt"})


def _read_sharded(d: Path, cfg: ModelConfig, tp_size: int, pp_size: int) -> dict[str, torch.Tensor]:
    from megaseg.megatron.convert import ConversionError, megatron_to_reference

    try:
        _check_parallel(cfg, tp_size, pp_size)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG_NAME}: {e}") from None
    per_stage = cfg.num_layers // pp_size
    ranks = []
    for tp in range(tp_size):
        merged: dict[str, torch.Tensor] = {}
        for pp in range(pp_size):
            path = d / _rank_dir(tp, pp) / WEIGHTS_NAME
            if not path.is_file():
                raise CheckpointError(f"{d}: missing shard {_rank_dir(tp, pp)}/{WEIGHTS_NAME} of tp={tp_size} pp={pp_size}")
            for name, t in _load_safetensors(path).items():
                if name.startswith("decoder.layers."):
                    layer, rest = name[len("decoder.layers."):].split(".", 1)
                    name = f"decoder.layers.{pp * per_stage + int(layer)}.{rest}"
                merged[name] = t
        ranks.append(merged)
    try:
        return megatron_to_reference(ranks, cfg)
    except ConversionError as e:
        raise CheckpointError(f"{d}: {e}") from None


def build_model(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None):
    """A reference model holding ``state_dict`` without a random init pass (safe for 7B)."""
    with torch.device("meta"):
        model = SegmentedLlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary frequencies, head index maps) are not in the state
    # dict and to_empty left them uninitialised: rebuild each layer's operator.
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.core = SegmentedAttention(
            cfg.head_plan.layer(i), cfg.segment, cfg.rope, cfg.head_dim, cfg.heads_per_group)
        layer.self_attn.core.layer_index = i
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, kept HF fields) from a megaseg checkpoint directory."""
    sd, cfg, hf = read_model_dir(path)
    return build_model(cfg, sd, dtype), hf


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer files from a directory, a single sentencepiece ``.model`` file, or a
    ``tokenizer.json`` (with the tokenizer_config.json beside it)."""
    s, d = Path(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    if s.is_file() and s.name.endswith(".json"):
        s = s.parent
    if s.is_file():
        if s.suffix != ".model":
            raise CheckpointError(f"{s}: a tokenizer file must be a sentencepiece .model or a tokenizer.json "
                                  "(or pass a directory)")
        shutil.copyfile(s, d / "tokenizer.model")
        return ["tokenizer.model"]
    if not s.is_dir():
        raise CheckpointError(f"{s}: tokenizer path does not exist")
    copied = []
    for name in TOKENIZER_FILES:
        if (s / name).is_file() and (s / name).resolve() != (d / name).resolve():
            shutil.copyfile(s / name, d / name)
            copied.append(name)
    return copied
