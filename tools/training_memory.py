"""Predicted peak memory per GPU of a training step (megaseg.training.memory_model).

    python tools/training_memory.py --table llama2-7b           # the table of docs/parallelism.md
    python tools/training_memory.py --table llama2-7b --json out.json

The LLaMA2-7B table: the paper's setting (S = 4096, M = R = 512, TBPTT-1, the
`paper-llama2-7b` head plan, bf16, the fused Triton kernel, distributed optimizer) on one
node of 8 GPUs, for 32K, 80K and 128K tokens per sequence (batch 1), for the layouts a
user would try, without and with full recompute. GiB = 2^30 bytes; an 80 GB GPU has 74.5
GiB, a 141 GB GPU 131.3 GiB (before the framework's own reserve).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.config import ModelConfig, SegmentConfig  # noqa: E402
from megaseg.segment_options import head_plan_from  # noqa: E402
from megaseg.training.memory_model import TrainingLayout, predict_training_memory  # noqa: E402

GIB = 2**30
GPUS = {"80 GB": 80e9 / GIB, "141 GB": 141e9 / GIB}
LENGTHS = (32768, 81920, 131072)
# (name, TP, CP): DP fills the 8 GPUs of a node; CP > 1 runs the context-parallel chunk path
LAYOUTS = (("TP1 CP1 DP8 (sequential)", 1, 1), ("TP2 CP1 DP4 (sequential)", 2, 1), ("TP1 CP2 DP4", 1, 2),
           ("TP1 CP4 DP2", 1, 4), ("TP1 CP8", 1, 8), ("TP2 CP4", 2, 4))


def llama2_7b() -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, segment=SegmentConfig(4096, 512, 512, 1),
                       head_plan=head_plan_from("paper-llama2-7b", 32, 32, num_long_range_heads=8))


def table(cfg: ModelConfig) -> list[dict]:
    rows = []
    for name, tp, cp in LAYOUTS:
        for recompute in ("none", "full"):
            row = {"layout": name, "tp": tp, "cp": cp, "dp": 8 // (tp * cp), "recompute": recompute}
            for T in LENGTHS:
                est = predict_training_memory(cfg, TrainingLayout(
                    seq_length=T, tbptt_k=1, tp=tp, cp=cp, dp=8 // (tp * cp), distributed_optimizer=True,
                    recompute=recompute, bf16=True, kernel="triton"))
                row[str(T)] = {**est.as_dict(), "total_gib": est.total / GIB}
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| layout | recompute | model state | 32K | 80K | 128K |")
    print("|---|---|---|---|---|---|")

    def cell(gib):
        fits = [name for name, cap in GPUS.items() if gib <= cap]
        mark = "fits 80 GB" if "80 GB" in fits else ("fits 141 GB" if fits else "does not fit")
        return f"{gib:.1f} ({mark})"

    for row in rows:
        state = row[str(LENGTHS[0])]["model_state"] / GIB
        print(f"| {row['layout']} | {row['recompute']} | {state:.1f} | "
              + " | ".join(cell(row[str(T)]["total_gib"]) for T in LENGTHS) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=["llama2-7b"], default="llama2-7b")
    p.add_argument("--json", default=None, help="also write the rows (bytes of every part) here")
    args = p.parse_args(argv)
    rows = table(llama2_7b())
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
