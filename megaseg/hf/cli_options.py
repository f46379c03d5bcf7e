"""Command-line options for segment settings and the head plan (conversion and generation tools).

    --segment-length 4096 --tail-length 512 --retrieval-length 512
    --head-plan interleaved --long-range-layers 6,8,11,18 --num-long-heads 8
    --head-plan plan.json            # explicit [[mode per KV group] per layer]

Defaults are the paper's (S=4096, M=512, R=512); R defaults to 0 when the plan has no
`retrieval` heads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megaseg.config import ConfigError, HeadPlan, SegmentConfig

PRESETS = ("local", "prior", "contiguous", "interleaved", "paper-llama2-7b")


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("segmented attention (defaults: the checkpoint's settings, else the paper's)")
    g.add_argument("--segment-length", type=int, help="S, tokens per segment (default 4096)")
    g.add_argument("--tail-length", type=int, help="M, carried KV tail of local heads (default 512)")
    g.add_argument("--retrieval-length", type=int, help="R, retrieved tokens of retrieval heads (default 512, 0 without retrieval heads)")
    g.add_argument("--tbptt-k", type=int, help="K, segments a loss reaches back in training (default 1)")
    g.add_argument("--head-plan", help=f"preset ({', '.join(PRESETS)}) or a JSON file [[mode, ...] per layer]")
    g.add_argument("--long-range-layers", type=_int_list, default=(), help="comma-separated layer indices, e.g. 6,8,11,18")
    g.add_argument("--long-heads", type=_int_list, help="comma-separated KV groups of H_long (preset prior)")
    g.add_argument("--num-long-heads", type=int, default=0, help="size of H_long (presets contiguous, interleaved)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def segment_options_given(args) -> bool:
    return any(getattr(args, k) is not None for k in ("segment_length", "tail_length", "retrieval_length", "tbptt_k", "head_plan"))


def resolve_segment_options(args, num_layers: int, num_kv_groups: int, base_segment: SegmentConfig | None = None,
                            base_plan: HeadPlan | None = None) -> tuple[SegmentConfig, HeadPlan]:
    """(segment settings, head plan): the options first, then the checkpoint's, then defaults."""
    plan = head_plan_from_options(args, num_layers, num_kv_groups) or base_plan
    plan = plan or HeadPlan.all_local(num_layers, num_kv_groups)
    return segment_from_options(args, plan, base_segment), plan


def head_plan_from_options(args, num_layers: int, num_kv_groups: int) -> HeadPlan | None:
    """The plan the options ask for, or None when --head-plan is not given."""
    spec = args.head_plan
    if spec is None:
        return None
    if spec not in PRESETS:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--head-plan={spec!r} is invalid: not a preset ({', '.join(PRESETS)}) nor a JSON file")
        try:
            modes = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--head-plan={spec!r} is invalid: {e.msg} at line {e.lineno}") from None
        return HeadPlan(tuple(tuple(layer) for layer in modes))
    return HeadPlan.preset(spec, num_layers, num_kv_groups, long_range_layers=args.long_range_layers,
                           long_heads=args.long_heads, num_long_heads=args.num_long_heads)


def segment_from_options(args, plan: HeadPlan, base: SegmentConfig | None = None) -> SegmentConfig:
    """SegmentConfig from the options for the effective ``plan``, filling gaps from ``base``
    (the checkpoint's settings) or the paper's defaults."""
    base = base or SegmentConfig(4096, 512, 512, 1)
    retrieval = args.retrieval_length
    if retrieval is None:
        retrieval = (base.retrieval_length or 512) if plan.has_retrieval() else 0
    return SegmentConfig(
        segment_length=args.segment_length if args.segment_length is not None else base.segment_length,
        tail_length=args.tail_length if args.tail_length is not None else base.tail_length,
        retrieval_length=retrieval,
        tbptt_k=args.tbptt_k if args.tbptt_k is not None else base.tbptt_k,
    )
