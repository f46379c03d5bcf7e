"""Recall accuracy and retrieval hit rate of checkpoints on planted-recall datasets.

    python tools/recall_eval.py --checkpoint aligned=runs/recall/segmented --checkpoint base=runs/recall/full \\
        --data 1x=data/recall_eval_256 --data 4x=data/recall_eval_1024 \\
        --mode own --mode no_retrieval --mode segmented=64:16:32:1:1 --json out.json

Every (checkpoint, data, mode) is evaluated with `megaseg.eval.recall.recall_accuracy`:
accuracy of every answer (teacher forced argmax), and for the answers whose needle lies
beyond the segment and the carried tail, the accuracy there and the share whose needle the
operator's retrieval actually picked (per retrieval head and for any of them), with the
correct/wrong x retrieved/not retrieved table, and the same for the needle span (a picked
token of the needle from its value on, which can carry the value), and the share of the
picks inside the document's needles. Datasets are ``--output-prefix`` values of
``tools/make_recall_data.py``. Modes:

* ``own``: the checkpoint's segment settings and head plan;
* ``no_retrieval``: the same with every retrieval group local and R = 0;
* ``full``: full causal attention over the whole document;
* ``streaming=SINKS:WINDOW``: StreamingLLM (attention sinks + a sliding window);
* ``duo=SINKS:WINDOW``: DuoAttention-style: the checkpoint's retrieval (layer, KV group)s
  keep full attention over the whole document, every other group sinks + a window;
* ``NAME=S:M:R:LAYERS:HEADS[:PRESET]``: megaseg with S, M, R and the `interleaved` (default)
  or `contiguous` plan of HEADS long-range KV groups in LAYERS (comma-separated; R = 0 gives
  an all-local plan); ``NAME=S:M:R:LAYERS:G+G:prior``: the `prior` plan, these KV groups;
* ``NAME=S:M:R:@PLAN_FILE``: megaseg with S, M, R and a head plan file (e.g. the plan
  `tools/select_heads.py` wrote): a full-attention model run segmented exactly as its
  continued-pretrained successor (the misaligned arm).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.checkpoint.errors import CheckpointError  # noqa: E402
from megaseg.config import ConfigError, HeadPlan, SegmentConfig  # noqa: E402
from megaseg.segment_options import OneLineArgumentParser  # noqa: E402

PROG = "recall_eval.py"


def _named(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is invalid: expected NAME=VALUE")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", action="append", required=True, type=lambda t: _named(t, "checkpoint"),
                   help="NAME=PATH of any checkpoint format (repeatable)")
    p.add_argument("--data", action="append", required=True, type=lambda t: _named(t, "data"),
                   help="NAME=PREFIX of a make_recall_data.py dataset (repeatable)")
    p.add_argument("--mode", action="append", default=None,
                   help="own | no_retrieval | full | streaming=SINKS:WINDOW | duo=SINKS:WINDOW | "
                        "NAME=S:M:R:LAYERS:HEADS[:interleaved|contiguous] | NAME=S:M:R:LAYERS:G+G:prior | "
                        "NAME=S:M:R:@PLAN_FILE (repeatable; default: own)")
    p.add_argument("--documents", type=int, default=40, help="documents per dataset (default 40)")
    p.add_argument("--json", default=None, help="write every result here")
    return p


def parse_mode(text: str, model_config):
    from megaseg.eval.modes import InferenceMode

    if text in ("own", "no_retrieval", "full"):
        return InferenceMode(text, kind={"own": "megaseg"}.get(text, text))
    name, _, spec = text.partition("=")
    if name in ("streaming", "duo"):
        try:
            sinks, window = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ConfigError(f"mode {text!r} is invalid: expected {name}=SINKS:WINDOW") from None
        if name == "duo":  # the checkpoint's retrieval groups keep full attention, the rest a window
            return InferenceMode(f"duo{window}", kind="duo", sinks=sinks, window=window,
                                 full_heads=model_config.head_plan)
        return InferenceMode(f"streaming{window}", kind="streaming", sinks=sinks, window=window)
    fields = spec.split(":")
    if len(fields) == 4 and fields[3].startswith("@"):  # NAME=S:M:R:@PLAN_FILE
        from megaseg.segment_options import read_plan_file

        try:
            S, M, R = (int(x) for x in fields[:3])
        except ValueError:
            raise ConfigError(f"mode {text!r} is invalid: expected NAME=S:M:R:@PLAN_FILE") from None
        plan = read_plan_file(fields[3][1:], what=f"mode {name}")
        if len(plan.modes) != model_config.num_layers or len(plan.modes[0]) != model_config.num_kv_heads:
            raise ConfigError(f"mode {text!r} is invalid: the plan has {len(plan.modes)} layers x {len(plan.modes[0])} "
                              f"KV groups, the model {model_config.num_layers} x {model_config.num_kv_heads}")
        return InferenceMode(name, segment=SegmentConfig(S, M, R, 1), head_plan=plan)
    L, G = model_config.num_layers, model_config.num_kv_heads
    try:
        S, M, R, layers, heads, *preset = fields
        S, M, R = int(S), int(M), int(R)
        layers = [int(x) for x in layers.split(",") if x]
        preset = preset[0] if preset else "interleaved"
        if len(fields) > 6 or preset not in PRESETS:
            raise ValueError
        if preset == "prior":  # HEADS: the KV groups themselves, '+'-separated
            groups = [int(x) for x in heads.split("+") if x]
        else:
            heads = int(heads)
    except ValueError:
        raise ConfigError(f"mode {text!r} is invalid: expected own, no_retrieval, full, streaming=SINKS:WINDOW, "
                          "duo=SINKS:WINDOW, NAME=S:M:R:LAYERS:HEADS[:interleaved|contiguous], "
                          "NAME=S:M:R:LAYERS:G+G..:prior or NAME=S:M:R:@PLAN_FILE") from None
    if not R:
        plan = HeadPlan.all_local(L, G)
    elif preset == "prior":
        plan = HeadPlan.prior(L, G, layers, groups)
    else:
        plan = getattr(HeadPlan, preset)(L, G, layers, heads)
    return InferenceMode(name, segment=SegmentConfig(S, M, R, 1), head_plan=plan)


PRESETS = ("interleaved", "contiguous", "prior")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\.")
    import torch

    from megaseg.checkpoint.formats import read_model
    from megaseg.eval.recall import load_recall_documents, recall_accuracy

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not torch.cuda.is_available():
        from megaseg.cpu_memory import keep_freed_memory

        keep_freed_memory()
    rows = []
    try:
        datasets = {name: load_recall_documents(prefix, limit=args.documents) for name, prefix in args.data}
        for ck_name, path in args.checkpoint:
            model = read_model(path).build().eval()
            modes = [parse_mode(m, model.config) for m in (args.mode or ["own"])]
            for data_name, docs in datasets.items():
                for mode in modes:
                    t = time.perf_counter()
                    r = recall_accuracy(model, mode, docs)
                    row = {"checkpoint": ck_name, "data": data_name, **vars(r), "seconds": time.perf_counter() - t}
                    rows.append(row)
                    print(_line(row), flush=True)
    except (ConfigError, CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=_jsonable) + "\n")
    return 0


def _fmt(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.3f}"


def _line(row: dict) -> str:
    heads = " ".join(f"{h}={_fmt(v)}" for h, v in row["hit_rate_per_head"].items())
    t, u = row["table"], row["span_table"]
    return (f"{row['checkpoint']:>10} {row['data']:>6} {row['mode']:>14} | length {row['length']:5d} | accuracy "
            f"{_fmt(row['accuracy'])} ({row['answers']} answers) | beyond tail {row['outside_reach']:4d}: accuracy "
            f"{_fmt(row['accuracy_outside_reach'])} hit rate {_fmt(row['hit_rate'])} {heads} | correct/wrong x "
            f"retrieved/not {t['correct_retrieved']}/{t['correct_not_retrieved']}/{t['wrong_retrieved']}/"
            f"{t['wrong_not_retrieved']} | span hit rate {_fmt(row['span_hit_rate'])}: "
            f"{u['correct_retrieved']}/{u['correct_not_retrieved']}/{u['wrong_retrieved']}/{u['wrong_not_retrieved']} | "
            f"needle share of picks {_fmt(row['needle_share'])} | state {row['state_mib']:.2f} MiB"
            + _bins(" | by depth", row.get("depth_accuracy")) + _bins(" | by prefix position", row.get("prefix_position_accuracy")))


def _bins(title: str, bins: dict | None) -> str:
    """' | by depth 0-25% 3/4 ...': correct/answers per quarter, empty where nothing was counted."""
    if not bins or not any(n for _, n in bins.values()):
        return ""
    return title + " " + " ".join(f"{q} {c}/{n}" for q, (c, n) in bins.items())


def _jsonable(x):
    return None if isinstance(x, float) and math.isnan(x) else str(x)


if __name__ == "__main__":
    sys.exit(main())
