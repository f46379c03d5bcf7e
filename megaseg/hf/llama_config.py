"""Hugging Face Llama ``config.json`` <-> megaseg ``ModelConfig``.

Reads the raw JSON dict (no transformers import), so import works from any Llama-2 or
Llama-3 checkpoint layout: ``rope_theta``/``rope_scaling`` (transformers 4.x) or
``rope_parameters`` (5.x), GQA through ``num_key_value_heads``, an explicit ``head_dim``.
An exported megaseg directory carries its segment settings and head plan under the
``megaseg`` key of the same file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from megaseg.checkpoint.errors import CheckpointError
from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MegasegLlamaForCausalLM")
LLAMA_MODEL_TYPES = ("llama", "megaseg_llama")
SEGMENTED_MODEL_TYPE = "megaseg_llama"
SEGMENTED_ARCHITECTURE = "MegasegLlamaForCausalLM"
REMOTE_CODE_MODULE = "modeling_megaseg"

# HF fields that megaseg does not model but keeps so that an export restores them.
PASSTHROUGH_KEYS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
                    "torch_dtype", "dtype")


def _require(hf: Mapping, key: str, source: str):
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{source}: config.json has no '{key}'")
    return hf[key]


def check_architecture(hf: Mapping, source: str) -> None:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES or (archs and not any(a in LLAMA_ARCHITECTURES for a in archs)):
        raise CheckpointError(
            f"{source}: unsupported architecture {archs or None} (model_type {model_type!r}); "
            f"megaseg converts Llama checkpoints ({', '.join(LLAMA_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (Llama has no biases)")


def rope_from_hf(hf: Mapping, source: str) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = params if params.get("rope_type", params.get("type")) not in (None, "default") else scaling
    kind = spec.get("rope_type", spec.get("type")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), scaling_type="linear", factor=float(spec["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=float(theta), scaling_type="llama3", factor=float(spec["factor"]),
            low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
            high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
        )
    raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported (allowed: default, linear, llama3)")


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """The ``rope_parameters`` dict transformers 5.x reads (``rope_theta`` inside)."""
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling_type or "default"}
    if rope.scaling_type in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.scaling_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    return out


def segment_section(hf: Mapping, source: str) -> tuple[SegmentConfig | None, HeadPlan | None]:
    """Segment settings and head plan of an exported config (None, None for plain Llama)."""
    section = hf.get("megaseg") or {}
    try:
        segment = SegmentConfig(**section["segment"]) if section.get("segment") else None
        plan = HeadPlan(tuple(tuple(layer) for layer in section["head_plan"])) if section.get("head_plan") else None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: bad 'megaseg' section in config.json: {e}") from None
    return segment, plan


def model_config_from_hf(
    hf: Mapping,
    segment: SegmentConfig | None = None,
    head_plan: HeadPlan | None = None,
    source: str = "checkpoint",
) -> ModelConfig:
    """ModelConfig for a HF Llama config dict.

    ``segment``/``head_plan`` override the ``megaseg`` section of an exported config; a
    plain Llama config has none, so they are then required (``segment`` at least; the
    plan defaults to all `local`).
    """
    check_architecture(hf, source)
    own_segment, own_plan = segment_section(hf, source)
    segment = segment or own_segment
    head_plan = head_plan or own_plan
    if segment is None:
        raise CheckpointError(f"{source}: a plain Llama config has no segment settings; pass them (segment length, tail, ...)")
    num_heads = int(_require(hf, "num_attention_heads", source))
    try:
        return ModelConfig(
            vocab_size=int(_require(hf, "vocab_size", source)),
            hidden_size=int(_require(hf, "hidden_size", source)),
            intermediate_size=int(_require(hf, "intermediate_size", source)),
            num_layers=int(_require(hf, "num_hidden_layers", source)),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=_megaseg_rope(hf, source) or rope_from_hf(hf, source),
            segment=segment,
            head_plan=head_plan,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _megaseg_rope(hf: Mapping, source: str) -> RopeConfig | None:
    """The exact RopeConfig a megaseg export wrote (None for other configs)."""
    section = (hf.get("megaseg") or {}).get("rope")
    if not section:
        return None
    try:
        return RopeConfig(**section)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: bad 'megaseg.rope' section in config.json: {e}") from None


def passthrough_from_hf(hf: Mapping) -> dict[str, Any]:
    return {k: hf[k] for k in PASSTHROUGH_KEYS if k in hf}


def hf_config_dict(cfg: ModelConfig, segmented: bool = True, passthrough: Mapping | None = None) -> dict[str, Any]:
    """config.json for an exported model.

    segmented=True: model_type ``megaseg_llama`` with ``auto_map`` to the bundled modeling
    code (needs ``trust_remote_code=True``). segmented=False: a plain ``llama`` config that
    stock transformers loads; the segment settings stay under ``megaseg`` for reference.
    """
    d: dict[str, Any] = {
        "architectures": [SEGMENTED_ARCHITECTURE if segmented else "LlamaForCausalLM"],
        "model_type": SEGMENTED_MODEL_TYPE if segmented else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "rope_parameters": rope_to_hf(cfg.rope),
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    d.update(passthrough or {})
    # Written whole: every SegmentConfig/RopeConfig field, so nothing is lost on the way back.
    d["megaseg"] = {
        "segmented": segmented,
        "segment": dataclasses.asdict(cfg.segment),
        "rope": dataclasses.asdict(cfg.rope),
        "head_plan": cfg.head_plan.to_list(),
    }
    if segmented:
        d["auto_map"] = {
            "AutoConfig": f"{REMOTE_CODE_MODULE}.MegasegLlamaConfig",
            "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.MegasegLlamaForCausalLM",
        }
    return d
