"""Hugging Face ``config.json`` of the Llama-shaped families <-> megaseg ``ModelConfig``.

A family (Llama 2/3.x, Mistral, Qwen2/Qwen2.5) is data (`FAMILIES`): its HF names, whether
q/k/v carry biases, and its sliding-window field; all of them run as one model. Reads the
raw JSON dict (no transformers import), so import works from any checkpoint layout:
``rope_theta``/``rope_scaling`` (transformers 4.x) or ``rope_parameters`` (5.x), GQA
through ``num_key_value_heads``, an explicit ``head_dim``. An exported megaseg directory
carries its segment settings and head plan under the ``megaseg`` key of the same file.

A top-level module below `megaseg.checkpoint` (which reads HF directories) and
`megaseg.hf` (conversion, remote modeling code): it depends on `megaseg.config` and
`megaseg.errors` only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.errors import CheckpointError

__all__ = [
    "FAMILIES", "LLAMA_ARCHITECTURES", "LLAMA_MODEL_TYPES", "OWNED_KEYS", "REMOTE_CODE_MODULE", "SEGMENTED_ARCHITECTURE",
    "SEGMENTED_MODEL_TYPE", "Family", "check_architecture", "check_window", "family_of", "hf_config_dict",
    "model_config_from_hf", "passthrough_from_hf", "rope_from_hf", "rope_to_hf", "segment_section", "sliding_window_of",
]

SEGMENTED_MODEL_TYPE = "megaseg_llama"
SEGMENTED_ARCHITECTURE = "MegasegLlamaForCausalLM"
REMOTE_CODE_MODULE = "modeling_megaseg"


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family maps onto megaseg's one (Llama-shaped) model.

    model_type/architecture: the HF names. qkv_bias: True when q/k/v always have biases
    (Qwen2). window_key: the config field of a sliding attention window, and
    window_switch: a field that must be true for the window to apply (Qwen2's
    ``use_sliding_window``); None when the family has no window.
    """

    model_type: str
    architecture: str
    qkv_bias: bool = False
    window_key: str | None = None
    window_switch: str | None = None


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM"),
    Family("mistral", "MistralForCausalLM", window_key="sliding_window"),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, window_key="sliding_window", window_switch="use_sliding_window"),
)}
LLAMA_ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values()) + (SEGMENTED_ARCHITECTURE,)
LLAMA_MODEL_TYPES = tuple(FAMILIES) + (SEGMENTED_MODEL_TYPE,)

# HF fields that megaseg writes itself from the ModelConfig (everything else of a base
# model's config.json is kept and restored on export).
OWNED_KEYS = ("architectures", "model_type", "auto_map", "megaseg", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_parameters",
              "rope_scaling", "rope_theta", "transformers_version", "torch_dtype", "dtype")


def _require(hf: Mapping, key: str, source: str):
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{source}: config.json has no '{key}'")
    return hf[key]


def family_of(hf: Mapping, source: str) -> Family:
    """The family of a HF config (an export names its base family under ``megaseg.family``)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type == SEGMENTED_MODEL_TYPE:
        model_type = (hf.get("megaseg") or {}).get("family", "llama")
    family = FAMILIES.get(model_type)
    if family is None or (archs and not any(a in (family.architecture, SEGMENTED_ARCHITECTURE) for a in archs)):
        supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        raise CheckpointError(
            f"{source}: unsupported architecture {archs or None} (model_type {hf.get('model_type')!r}); "
            f"megaseg converts {supported}"
        )
    return family


def check_architecture(hf: Mapping, source: str) -> Family:
    """The family of ``hf``; CheckpointError naming the field of a config it cannot run."""
    family = family_of(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (megaseg's MLP is SwiGLU with 'silu')")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (megaseg's MLP has no biases)")
    if hf.get("attention_bias") and hf.get("model_type") != SEGMENTED_MODEL_TYPE:
        raise CheckpointError(f"{source}: attention_bias=true is not supported (it adds an o_proj bias; "
                              "megaseg supports q/k/v biases only, as in Qwen2)")
    for key in ("partial_rotary_factor",):
        if hf.get(key) not in (None, 1, 1.0):
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (megaseg rotates the whole head)")
    return family


def sliding_window_of(hf: Mapping, family: Family) -> int | None:
    """The attention window a base model was trained with (None: full attention)."""
    if family.window_key is None:
        return None
    if family.window_switch is not None and not hf.get(family.window_switch):
        return None
    window = hf.get(family.window_key)
    return int(window) if window else None


def check_window(hf: Mapping, family: Family, segment: SegmentConfig, source: str) -> None:
    """A sliding window is honoured when no local or segment head can reach past it: a query
    sees at most tail_length + segment_length keys (retrieval heads read beyond it by
    design, as the long-range channel). Anything else is refused, never dropped."""
    window = sliding_window_of(hf, family)
    if window is None:
        return
    reach = segment.segment_length + segment.tail_length
    if reach > window:
        raise CheckpointError(
            f"{source}: {family.window_key}={window} is smaller than segment_length + tail_length = "
            f"{segment.segment_length} + {segment.tail_length} = {reach}: local heads would attend past the "
            f"window the model was trained with; choose segment_length + tail_length <= {window}"
        )


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
    family = check_architecture(hf, source)
    own_segment, own_plan = segment_section(hf, source)
    segment = segment or own_segment
    head_plan = head_plan or own_plan
    if segment is None:
        raise CheckpointError(f"{source}: a plain {family.architecture} config has no segment settings; "
                              "pass them (segment length, tail, ...)")
    check_window(hf, family, segment, source)
    if hf.get("model_type") == SEGMENTED_MODEL_TYPE:
        qkv_bias = bool((hf.get("megaseg") or {}).get("qkv_bias", family.qkv_bias))
    else:
        qkv_bias = family.qkv_bias
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
            qkv_bias=qkv_bias,
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
    """Every field of a base model's config.json that megaseg does not write itself (max
    positions, special ids and eos lists, window fields, ...), so an export restores them.
    A megaseg export keeps what it carried through, and its base family."""
    kept = {k: v for k, v in hf.items() if k not in OWNED_KEYS and not k.startswith("_")}
    if hf.get("model_type") == SEGMENTED_MODEL_TYPE:
        family = (hf.get("megaseg") or {}).get("family", "llama")
    else:
        family = hf.get("model_type", "llama")
    return {**kept, "model_type": family}


def hf_config_dict(cfg: ModelConfig, segmented: bool = True, passthrough: Mapping | None = None) -> dict[str, Any]:
    """config.json for an exported model.

    segmented=True: model_type ``megaseg_llama`` with ``auto_map`` to the bundled modeling
    code (needs ``trust_remote_code=True``). segmented=False: a plain config of the base
    family (``llama``, ``qwen2``, ``mistral``; ``passthrough["model_type"]``) that stock
    transformers loads; the segment settings stay under ``megaseg`` for reference.
    ``passthrough`` (the base model's other fields) is written back as it was.
    """
    passthrough = dict(passthrough or {})
    family = FAMILIES.get(passthrough.pop("model_type", None) or "llama", FAMILIES["llama"])
    if family.qkv_bias != cfg.qkv_bias:  # a model trained from scratch with or without q/k/v biases
        family = FAMILIES["qwen2" if cfg.qkv_bias else "llama"]
    d: dict[str, Any] = {
        "architectures": [SEGMENTED_ARCHITECTURE if segmented else family.architecture],
        "model_type": SEGMENTED_MODEL_TYPE if segmented else family.model_type,
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
    d.update(passthrough)
    # Written whole: every SegmentConfig/RopeConfig field, so nothing is lost on the way back.
    d["megaseg"] = {
        "segmented": segmented,
        "family": family.model_type,
        "qkv_bias": cfg.qkv_bias,
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
