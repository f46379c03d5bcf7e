"""Inference modes of one set of weights: megaseg segmented, megaseg without retrieval, full
attention, StreamingLLM, DuoAttention-style. A mode swaps every layer's attention core;
nothing else changes.

Modes run on megaseg's reference model, whatever the checkpoint format: load it with
`megaseg.eval.loading.load_for_eval` (any path `read_model` accepts); ``installed`` also takes
a transformers model (a megaseg HF export or a plain Llama/Qwen2/Mistral) and yields its
reference copy (`megaseg.eval.loading.reference_model`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from megaseg.checkpoint.errors import CheckpointError
from megaseg.config import ConfigError, HeadPlan, SegmentConfig
from megaseg.eval.baselines import FULL, WINDOW, BaselineAttention
from megaseg.eval.loading import model_config, reference_model
from megaseg.ops.segmented_attention import SegmentedAttention
from megaseg.segment_options import read_plan_file, without_retrieval

KINDS = ("megaseg", "no_retrieval", "full", "streaming", "duo")
SEGMENTED_KINDS = ("megaseg", "no_retrieval")


@dataclass(frozen=True)
class InferenceMode:
    """One way to run the weights.

    kind:        megaseg | no_retrieval | full | streaming | duo. ``no_retrieval`` is megaseg
                 with every `retrieval` (layer, KV group) turned `local` and R = 0 (same S and
                 M; `segment` groups unchanged): what the model does without its long-range
                 channel.
    segment, head_plan: megaseg and no_retrieval; None keeps the model's own settings.
    sinks, window: streaming and duo (the non-full heads).
    full_heads:  duo: {layer: [KV groups]} that keep full attention, or a HeadPlan whose
                 `retrieval` groups are taken as the full ones.
    chunk:       tokens per call when streaming a sequence (None: the model's segment length).
    max_length:  longest context the mode accepts (None: no limit).
    """

    name: str
    kind: str = "megaseg"
    segment: SegmentConfig | None = None
    head_plan: HeadPlan | None = None
    sinks: int = 4
    window: int = 256
    full_heads: Mapping[int, Sequence[int]] | None = field(default=None, hash=False)
    chunk: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"mode kind={self.kind!r} is invalid: allowed {', '.join(KINDS)}")
        if self.kind == "duo" and self.full_heads is None:
            raise ConfigError(f"mode {self.name!r}: kind 'duo' needs full_heads ({{layer: [KV groups]}} or a head plan)")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ConfigError(f"mode {self.name!r}: chunk={self.chunk!r} is invalid: must be an integer >= 1")

    def check_length(self, length: int) -> None:
        if not isinstance(length, int) or length < 2:
            raise ConfigError(f"length={length!r} is invalid: a context needs at least 2 tokens")
        if self.max_length is not None and length > self.max_length:
            raise ConfigError(f"length={length} is invalid for mode {self.name!r}: it runs at most {self.max_length} tokens")

    def chunk_size(self, model) -> int:
        return self.chunk or self.settings(model_config(model))[0].segment_length

    def settings(self, cfg) -> tuple[SegmentConfig, HeadPlan]:
        """(segment settings, head plan) a megaseg or no_retrieval mode runs ``cfg`` with
        (the model's own ones for the other kinds)."""
        seg, plan = self.segment or cfg.segment, self.head_plan or cfg.head_plan
        if self.kind == "no_retrieval":
            seg, plan = without_retrieval(seg, plan)
        return seg, plan

    def cores(self, model) -> list:
        cfg = model_config(model)
        if self.kind in SEGMENTED_KINDS:
            seg, plan = self.settings(cfg)
            try:
                cfg.replace(segment=seg, head_plan=plan)  # validates plan shape and R vs plan
            except ConfigError as e:
                raise ConfigError(f"mode {self.name!r}: {e}") from None
            return [SegmentedAttention(plan.layer(i), seg, cfg.rope, cfg.head_dim, cfg.heads_per_group)
                    for i in range(cfg.num_layers)]
        full = _full_groups(self, cfg.num_layers, cfg.num_kv_heads)
        return [BaselineAttention([FULL if g in full.get(i, ()) else WINDOW for g in range(cfg.num_kv_heads)],
                                  cfg.rope, cfg.head_dim, cfg.heads_per_group, self.sinks, self.window)
                for i in range(cfg.num_layers)]


def _full_groups(mode: InferenceMode, num_layers: int, num_groups: int) -> dict[int, tuple[int, ...]]:
    if mode.kind == "full":
        return {i: tuple(range(num_groups)) for i in range(num_layers)}
    if mode.kind == "streaming":
        return {}
    heads = mode.full_heads
    if isinstance(heads, HeadPlan):
        if (heads.num_layers, heads.num_kv_groups) != (num_layers, num_groups):
            raise ConfigError(f"mode {mode.name!r}: head plan is {heads.num_layers} x {heads.num_kv_groups}, "
                              f"the model has {num_layers} layers x {num_groups} KV groups")
        return {i: tuple(g for g, m in enumerate(layer) if m == "retrieval") for i, layer in enumerate(heads.modes)}
    out = {}
    for layer, groups in heads.items():
        layer = int(layer)
        if not 0 <= layer < num_layers or any(not 0 <= int(g) < num_groups for g in groups):
            raise ConfigError(f"mode {mode.name!r}: full_heads {dict(heads)} outside {num_layers} layers x {num_groups} groups")
        out[layer] = tuple(int(g) for g in groups)
    return out


@contextlib.contextmanager
def installed(model, mode: InferenceMode):
    """Run ``model`` in ``mode`` inside the block, which yields the model to call: ``model``
    itself when it is megaseg's reference model (its original cores come back after the
    block), else its reference copy (`megaseg.eval.loading.reference_model`)."""
    try:
        model = reference_model(model)
    except CheckpointError as e:
        raise ConfigError(f"mode {mode.name!r}: {e}") from None
    layers = model.model.layers
    saved = [layer.self_attn.core for layer in layers]
    try:
        for layer, core in zip(layers, mode.cores(model)):
            layer.self_attn.core = core.to(next(model.parameters()).device)
        yield model
    finally:
        for layer, core in zip(layers, saved):
            layer.self_attn.core = core


def mode_from_dict(d: Mapping, num_layers: int | None = None, num_groups: int | None = None) -> InferenceMode:
    """An InferenceMode from a YAML mapping (keys as the dataclass fields, e.g.
    ``{name: no_retrieval, kind: no_retrieval}``; ``segment`` a
    mapping of SegmentConfig fields; ``head_plan``/``full_heads`` a list of per-layer modes
    or a path to a head plan JSON)."""
    d = dict(d)
    known = set(InferenceMode.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"mode {d.get('name')!r}: unknown keys {unknown}; allowed {sorted(known)}")
    if "name" not in d:
        raise ConfigError(f"mode {d!r}: needs a name")
    if isinstance(d.get("segment"), Mapping):
        d["segment"] = SegmentConfig(**d["segment"])
    for key in ("head_plan", "full_heads"):
        v = d.get(key)
        if isinstance(v, str):
            d[key] = read_plan_file(v, what="head plan")
        elif isinstance(v, (list, tuple)):
            d[key] = HeadPlan(tuple(tuple(x) for x in v))
    return InferenceMode(**d)
