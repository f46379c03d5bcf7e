"""Split every KV group of a checkpoint into copies, so a head plan can give a retrieval
pool to fewer query heads.

    # 2 KV groups of 2 query heads -> 4 groups of 1, the plan of every copy inherited
    python tools/split_kv_groups.py runs/recall/aligned runs/recall/split --kv-groups 4
    # ... one copy of each retrieval group keeps the retrieval pool, the other becomes local
    python tools/split_kv_groups.py runs/recall/aligned runs/recall/split --kv-groups 4 \\
        --retrieval-copies 1 --plan-output runs/recall/plan_split.json
    # ... or any plan of the new shape
    python tools/split_kv_groups.py runs/recall/aligned runs/recall/split --kv-groups 4 --head-plan-file plan.json

Reads any checkpoint format (a pretraining --save directory or iter_* directory at any
TP/PP layout, a megaseg model directory, an HF directory) and writes a megaseg model
directory, which pretraining's --pretrained-checkpoint, tools/recall_eval.py,
tools/evaluate.py and tools/convert_hf.py export read. Each query head keeps reading the
keys and values it read before, so full attention and every `local` or `segment` group
compute exactly what the source computes; a `retrieval` copy selects its prefix with its own
query heads only, so the split model is meant for continued pretraining under its new plan
(docs/evaluation.md, "Splitting KV groups").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.checkpoint.errors import CheckpointError  # noqa: E402
from megaseg.checkpoint.formats import read_model  # noqa: E402
from megaseg.checkpoint.regroup import plan_share, split_kv_groups  # noqa: E402
from megaseg.checkpoint.weights import save_model_dir  # noqa: E402
from megaseg.config import ConfigError  # noqa: E402
from megaseg.segment_options import OneLineArgumentParser, read_plan_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", help="any checkpoint: pretraining --save or iter_* directory, megaseg or HF directory")
    p.add_argument("out", help="megaseg model directory to write")
    p.add_argument("--kv-groups", type=int, required=True,
                   help="KV groups per layer of the written model (a multiple of the source's that divides the heads)")
    p.add_argument("--head-plan-file", default=None,
                   help="plan of the written model ([[mode per KV group] per layer]); default: every copy "
                        "keeps its source group's mode")
    p.add_argument("--retrieval-copies", type=int, default=None,
                   help="keep only the last N copies of each retrieval group as retrieval, the others local")
    p.add_argument("--plan-output", default=None,
                   help="also write the written model's head plan here (what --head-plan-file reads)")
    return p


def run(args) -> int:
    src = read_model(args.src)
    plan = read_plan_file(args.head_plan_file) if args.head_plan_file else None
    if plan is not None and (plan.num_layers, plan.num_kv_groups) != (src.config.num_layers, args.kv_groups):
        raise ConfigError(f"head_plan_file={args.head_plan_file!r} is invalid: it has {plan.num_layers} layers x "
                          f"{plan.num_kv_groups} KV groups, the written model {src.config.num_layers} x {args.kv_groups}")
    sd, cfg = split_kv_groups(src.state_dict, src.config, args.kv_groups, plan, args.retrieval_copies)
    save_model_dir(args.out, sd, cfg, src.hf, tokenizer_from=src.tokenizer)
    if args.plan_output:
        Path(args.plan_output).write_text(json.dumps(cfg.head_plan.to_list()) + "\n")
    print(f"split {args.src} -> {args.out}: {src.config.num_kv_heads} -> {cfg.num_kv_heads} KV groups per layer "
          f"({cfg.num_heads // cfg.num_kv_heads} query head(s) each); retrieval groups "
          f"{plan_share(src.config.head_plan)} -> {plan_share(cfg.head_plan)} (layer, KV group) pairs")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
