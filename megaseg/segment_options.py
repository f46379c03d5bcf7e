"""The segment settings and head-plan options, defined once for pretraining and every tool.

    --segment-length 4096 --tail-length 512 --retrieval-length 512 --tbptt-k 1
    --retrieval-group-reduce sum
    --head-plan-preset interleaved --long-range-layers 6 8 11 18 --num-long-range-heads 8
    --head-plan-preset prior --long-range-layers 6 8 --long-range-heads 0 3
    --head-plan-file plan.json       # explicit [[mode per KV group] per layer]; wins over the preset

Tools that run or export a checkpoint (generation, HF export) also take two overrides
(`add_override_options`, `resolve_overrides`):

    --full-attention   one segment as long as the model's max context (or --segment-length),
                       every KV group `local`, M = R = 0: plain causal attention
    --no-retrieval     every `retrieval` group becomes `local` (same S and M), R = 0

`SEGMENT_OPTIONS` names each option's type, help and choices. Pretraining
(`megaseg.training.arguments.PretrainConfig`) declares its fields from it with the default
run's values; conversion, generation and evaluation tools add the same flags with no
default, meaning "the checkpoint's setting" (`add_segment_options`,
`resolve_segment_options`). `head_plan_from` is the one function turning the options into a
`HeadPlan`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megaseg.config import GROUP_REDUCTIONS, LOCAL, RETRIEVAL, ConfigError, HeadPlan, SegmentConfig
from megaseg.hf_config import FAMILIES, hf_config_dict, passthrough_from_hf, sliding_window_of

HEAD_PLAN_PRESETS = ("local", "prior", "contiguous", "interleaved", "paper-llama2-7b")


@dataclass(frozen=True)
class Option:
    type: type
    help: str
    choices: tuple[str, ...] | None = None
    is_list: bool = False


SEGMENT_OPTIONS: dict[str, Option] = {
    "segment_length": Option(int, "S: tokens per segment"),
    "tail_length": Option(int, "M: carried KV tail of `local` heads"),
    "retrieval_length": Option(int, "R: retrieved prefix of `retrieval` heads (0 when none)"),
    "tbptt_k": Option(int, "K: segments a loss backpropagates through (0 = detach every tail, -1 = untruncated)"),
    "retrieval_group_reduce": Option(str, "how a KV group's query heads combine retrieval scores", GROUP_REDUCTIONS),
    "head_plan_preset": Option(str, "how long-range heads are chosen", HEAD_PLAN_PRESETS),
    "long_range_layers": Option(int, "0-based layers whose long-range heads retrieve", is_list=True),
    "num_long_range_heads": Option(int, "long-range KV groups per layer (contiguous/interleaved presets)"),
    "long_range_heads": Option(int, "explicit long-range KV groups (prior preset)", is_list=True),
    "head_plan_file": Option(str, "JSON file with the whole plan [[mode per KV group] per layer]; overrides the preset"),
}
PLAN_OPTIONS = ("head_plan_preset", "long_range_layers", "num_long_range_heads", "long_range_heads", "head_plan_file")
SEGMENT_FIELDS = ("segment_length", "tail_length", "retrieval_length", "tbptt_k", "retrieval_group_reduce")


def read_plan_file(path: str | os.PathLike, what: str = "head_plan_file") -> HeadPlan:
    """The one reader of head plan JSON files, for pretraining, the tools and evaluation;
    it takes every file ``tools/select_heads.py`` writes (`megaseg.eval.head_selection.write_plan`):
    ``[[mode, ...] per layer]`` (the plan file), or an object holding that list under
    ``modes`` (the ``.scores.json`` sidecar beside it) or ``head_plan`` (a plan with its
    provenance). ``what`` names the setting in error messages."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}={str(path)!r} is invalid: no such file")
    try:
        modes = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}={str(path)!r} is invalid: {e.msg} at line {e.lineno}") from None
    if isinstance(modes, dict):
        modes = modes.get("modes", modes.get("head_plan"))
    if not isinstance(modes, list) or not all(isinstance(layer, list) for layer in modes):
        raise ConfigError(f"{what}={str(path)!r} is invalid: expected [[mode, ...] per layer], or an object "
                          "with it under 'modes' or 'head_plan'")
    try:
        return HeadPlan(tuple(tuple(layer) for layer in modes))
    except ConfigError as e:
        raise ConfigError(f"{what}={str(path)!r} is invalid: {e}") from None


def head_plan_from(preset: str, num_layers: int, num_kv_groups: int, long_range_layers: Sequence[int] = (),
                   num_long_range_heads: int = 0, long_range_heads: Sequence[int] | None = None,
                   head_plan_file: str | None = None) -> HeadPlan:
    """The head plan the options describe (a plan file wins over the preset)."""
    if head_plan_file:
        plan = read_plan_file(head_plan_file)
        if (plan.num_layers, plan.num_kv_groups) != (num_layers, num_kv_groups):
            raise ConfigError(
                f"head_plan_file={head_plan_file!r} is invalid: it has {plan.num_layers} layers x "
                f"{plan.num_kv_groups} KV groups, the model {num_layers} x {num_kv_groups}")
        return plan
    if preset not in HEAD_PLAN_PRESETS:
        raise ConfigError(f"head_plan_preset={preset!r} is invalid: allowed: {', '.join(HEAD_PLAN_PRESETS)}")
    return HeadPlan.preset(preset, num_layers, num_kv_groups, long_range_layers=tuple(long_range_layers),
                           long_range_heads=tuple(long_range_heads) if long_range_heads else None,
                           num_long_range_heads=num_long_range_heads)


# ---- tools: the same flags, defaulting to the checkpoint's settings ------------------------------
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("segmented attention (default: the checkpoint's settings; the paper's for plain Llama)")
    for name, opt in SEGMENT_OPTIONS.items():
        kw = {"dest": name, "default": None, "help": opt.help}
        if opt.is_list:
            g.add_argument(flag(name), nargs="+", type=_int_items, metavar="INT", **kw)
        elif opt.choices:
            g.add_argument(flag(name), choices=opt.choices, **kw)
        else:
            g.add_argument(flag(name), type=opt.type, **kw)


def _int_items(text: str) -> list[int]:
    """One or several integers per word: `--long-range-layers 6 8` or `--long-range-layers 6,8`."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None


def _flat(values) -> list[int] | None:
    if values is None:
        return None
    return [v for item in values for v in (item if isinstance(item, list) else [item])]


def segment_options_given(args) -> bool:
    return any(getattr(args, name, None) is not None for name in SEGMENT_OPTIONS)


def resolve_segment_options(args, num_layers: int, num_kv_groups: int, base_segment: SegmentConfig | None = None,
                            base_plan: HeadPlan | None = None) -> tuple[SegmentConfig, HeadPlan]:
    """(segment settings, head plan): the options first, then the checkpoint's, then defaults
    (the paper's S = 4096, M = R = 512, K = 1; an all-`local` plan)."""
    plan = head_plan_from_options(args, num_layers, num_kv_groups) or base_plan
    plan = plan or HeadPlan.all_local(num_layers, num_kv_groups)
    return segment_from_options(args, plan, base_segment), plan


def head_plan_from_options(args, num_layers: int, num_kv_groups: int) -> HeadPlan | None:
    """The plan the options ask for, or None when neither a preset nor a plan file is given."""
    if args.head_plan_file is None and args.head_plan_preset is None:
        for name in ("long_range_layers", "num_long_range_heads", "long_range_heads"):
            if getattr(args, name) is not None:
                raise ConfigError(f"{flag(name)} is invalid without --head-plan-preset (or --head-plan-file)")
        return None
    return head_plan_from(args.head_plan_preset or "local", num_layers, num_kv_groups,
                          long_range_layers=_flat(args.long_range_layers) or (),
                          num_long_range_heads=args.num_long_range_heads or 0,
                          long_range_heads=_flat(args.long_range_heads), head_plan_file=args.head_plan_file)


def segment_from_options(args, plan: HeadPlan, base: SegmentConfig | None = None) -> SegmentConfig:
    """SegmentConfig from the options for the effective ``plan``, filling gaps from ``base``
    (the checkpoint's settings) or the paper's defaults."""
    base = base or SegmentConfig(4096, 512, 512, 1)
    retrieval = args.retrieval_length
    if retrieval is None:
        retrieval = (base.retrieval_length or 512) if plan.has_retrieval() else 0
    values = {name: getattr(args, name) if getattr(args, name) is not None else getattr(base, name)
              for name in SEGMENT_FIELDS}
    values["retrieval_length"] = retrieval
    return SegmentConfig(**values)


# ---- overrides of what a checkpoint runs with: full attention, no retrieval ---------------------
def full_attention(num_layers: int, num_kv_groups: int, length: int,
                   base: SegmentConfig | None = None) -> tuple[SegmentConfig, HeadPlan]:
    """One segment of ``length`` tokens, every KV group `local`, M = R = 0: plain causal
    attention for any sequence of at most ``length`` tokens (docs/semantics.md §7). K and the
    group reduction are kept from ``base`` (they change nothing at inference)."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"segment_length={length!r} is invalid for full attention: must be an integer > 0")
    base = base or SegmentConfig(4096, 512, 512, 1)
    segment = SegmentConfig(length, 0, 0, base.tbptt_k, base.retrieval_group_reduce)
    return segment, HeadPlan.all_local(num_layers, num_kv_groups)


def without_retrieval(segment: SegmentConfig, plan: HeadPlan) -> tuple[SegmentConfig, HeadPlan]:
    """The same settings with every `retrieval` (layer, KV group) turned `local` and R = 0
    (S, M and the `segment` groups unchanged)."""
    modes = tuple(tuple(LOCAL if m == RETRIEVAL else m for m in layer) for layer in plan.modes)
    return dataclasses.replace(segment, retrieval_length=0), HeadPlan(modes)


def describe(segment: SegmentConfig, plan: HeadPlan) -> str:
    """``S=.. M=.. R=.., plan a local / b retrieval / c segment``."""
    return (f"S={segment.segment_length} M={segment.tail_length} R={segment.retrieval_length}, plan "
            f"{plan.count('local')} local / {plan.count('retrieval')} retrieval / {plan.count('segment')} segment")


def add_override_options(parser: argparse.ArgumentParser) -> None:
    """--full-attention and --no-retrieval (one or the other), beside `add_segment_options`."""
    g = parser.add_argument_group("overrides of the checkpoint's segmented attention")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--full-attention", action="store_true",
                     help="one segment as long as the model's max context (max_position_embeddings, capped at a "
                          "sliding window; or --segment-length), every KV group local, M = R = 0")
    one.add_argument("--no-retrieval", action="store_true",
                     help="every retrieval KV group becomes local (same S and M), R = 0")


def overrides_given(args) -> bool:
    return segment_options_given(args) or bool(getattr(args, "full_attention", False)) \
        or bool(getattr(args, "no_retrieval", False))


@dataclass(frozen=True)
class CheckpointSettings:
    """What a checkpoint records about its attention, read without its weights.

    segment/plan are None for a plain Hugging Face directory. max_context: the
    ``max_position_embeddings`` its (exported) config.json gives, capped at a sliding window
    the model was trained with — the length of a --full-attention segment.
    """

    num_layers: int
    num_kv_groups: int
    segment: SegmentConfig | None
    plan: HeadPlan | None
    max_context: int


def hf_max_context(hf) -> int:
    """``max_position_embeddings`` of a HF config dict (4096 when absent), capped at the
    sliding window its family applies: the longest context the model attended over whole."""
    length = int(hf.get("max_position_embeddings") or 4096)
    family = FAMILIES.get(hf.get("model_type") or "llama")
    window = sliding_window_of(hf, family) if family is not None else None
    return min(length, window) if window else length


def checkpoint_settings(path) -> CheckpointSettings:
    """`CheckpointSettings` of any checkpoint format `megaseg.checkpoint.formats` reads."""
    from megaseg.checkpoint.formats import HF_LLAMA, checkpoint_shape, detect_format, read_model
    from megaseg.checkpoint.weights import read_json

    if detect_format(path) == HF_LLAMA:
        layers, groups, segment, plan = checkpoint_shape(path)
        hf = passthrough_from_hf(read_json(Path(path) / "config.json"))
    else:
        src = read_model(path, weights=False)
        cfg = src.config
        layers, groups, segment, plan = cfg.num_layers, cfg.num_kv_heads, cfg.segment, cfg.head_plan
        # The max_position_embeddings its HF export writes (the base model's, else the export default).
        hf = {**src.hf, "max_position_embeddings": hf_config_dict(cfg, passthrough=src.hf).get("max_position_embeddings")}
    return CheckpointSettings(layers, groups, segment, plan, hf_max_context(hf))


def resolve_overrides(args, ckpt: CheckpointSettings) -> tuple[SegmentConfig, HeadPlan] | None:
    """(segment settings, head plan) that the segment options and --full-attention /
    --no-retrieval ask for, on top of the checkpoint's; None when nothing is asked and the
    checkpoint has settings of its own (a plain HF directory without options gets the
    defaults of `resolve_segment_options`)."""
    layers, groups = ckpt.num_layers, ckpt.num_kv_groups
    if getattr(args, "full_attention", False):
        for name in SEGMENT_OPTIONS:
            if name not in ("segment_length", "tbptt_k", "retrieval_group_reduce") and getattr(args, name) is not None:
                raise ConfigError(f"{flag(name)} is invalid with --full-attention "
                                  "(one segment, every KV group local, M = R = 0)")
        base = dataclasses.replace(ckpt.segment or SegmentConfig(4096, 512, 512, 1),
                                   **{k: getattr(args, k) for k in ("tbptt_k", "retrieval_group_reduce")
                                      if getattr(args, k) is not None})
        length = ckpt.max_context if args.segment_length is None else args.segment_length
        return full_attention(layers, groups, length, base)
    no_retrieval = bool(getattr(args, "no_retrieval", False))
    if not overrides_given(args) and ckpt.segment is not None:
        return None
    if no_retrieval and args.retrieval_length:
        raise ConfigError(f"--retrieval-length={args.retrieval_length} is invalid with --no-retrieval (it sets R = 0)")
    segment, plan = resolve_segment_options(args, layers, groups, ckpt.segment, ckpt.plan)
    return without_retrieval(segment, plan) if no_retrieval else (segment, plan)
