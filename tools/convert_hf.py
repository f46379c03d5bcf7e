"""Convert between Hugging Face Llama directories and megaseg checkpoints.

    # HF Llama (safetensors or .bin, Llama-2/3 configs) -> megaseg checkpoint (optionally TP/PP shards)
    python tools/convert_hf.py import HF_DIR OUT_DIR --segment-length 4096 --tail-length 512 \\
        --head-plan-preset interleaved --long-range-layers 6 8 11 18 --num-long-range-heads 8 --tp 2 --pp 2
    python tools/convert_hf.py import HF_DIR OUT_DIR --head-plan-preset paper-llama2-7b

    # a pretraining checkpoint (its --save directory or one iter_* directory, any TP/PP layout)
    # or a megaseg model directory -> HF directory (model and tokenizer load with trust_remote_code=True)
    python tools/convert_hf.py export runs/default/checkpoints HF_OUT [--tokenizer PATH] [--dtype bfloat16]
    # ... or a plain Llama directory that stock transformers loads (segmentation off)
    python tools/convert_hf.py export CKPT_DIR HF_OUT --no-segmentation
    # ... running other settings than the checkpoint's: the segment options, or
    python tools/convert_hf.py export CKPT_DIR HF_OUT --full-attention   # one segment, all local, M = R = 0
    python tools/convert_hf.py export CKPT_DIR HF_OUT --no-retrieval     # retrieval groups -> local, R = 0
    # (config.json's `megaseg` section then keeps the checkpoint's own settings under `overridden_from`)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.config import ConfigError  # noqa: E402
from megaseg.checkpoint.errors import CheckpointError  # noqa: E402
from megaseg.checkpoint.formats import HF_LLAMA, HF_MEGASEG, checkpoint_shape, detect_format  # noqa: E402
from megaseg.checkpoint.weights import parse_dtype  # noqa: E402
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint  # noqa: E402
from megaseg.segment_options import (  # noqa: E402
    OneLineArgumentParser, add_override_options, add_segment_options, checkpoint_settings, describe, resolve_overrides,
    resolve_segment_options,
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF Llama directory -> megaseg checkpoint directory")
    imp.add_argument("src", help="HF directory (config.json + safetensors or pytorch_model.bin)")
    imp.add_argument("out", help="megaseg checkpoint directory to write")
    imp.add_argument("--dtype", default=None, help="cast weights: float32 | bfloat16 | float16 (default: keep)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    add_segment_options(imp)
    exp = sub.add_parser("export", help="pretraining checkpoint or megaseg model directory -> HF directory")
    exp.add_argument("src", help="pretraining --save directory, one iter_* directory, or a megaseg model directory")
    exp.add_argument("out", help="HF directory to write")
    exp.add_argument("--dtype", default=None, help="cast weights: float32 | bfloat16 | float16 (default: keep)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer directory or .model file (default: the checkpoint's)")
    exp.add_argument("--no-segmentation", action="store_true",
                     help="write a plain Llama config (stock transformers, no remote code)")
    add_segment_options(exp)
    add_override_options(exp)
    return p


def run(args) -> int:
    dtype = parse_dtype(args.dtype)
    if args.command == "import":
        fmt = detect_format(args.src)
        if fmt not in (HF_LLAMA, HF_MEGASEG):
            raise CheckpointError(f"{args.src}: is a {fmt} checkpoint, not a Hugging Face directory; "
                                  "`import` reads HF Llama directories (use `export` to go the other way)")
        layers, groups, base_segment, base_plan = checkpoint_shape(args.src)
        segment, plan = resolve_segment_options(args, layers, groups, base_segment, base_plan)
        cfg = import_hf_checkpoint(args.src, args.out, segment, plan, dtype, tp_size=args.tp, pp_size=args.pp)
        print(f"imported {args.src} -> {args.out}: {cfg.num_layers} layers, {cfg.num_heads} heads / "
              f"{cfg.num_kv_heads} KV, S={segment.segment_length} M={segment.tail_length} R={segment.retrieval_length}, "
              f"plan {plan.count('local')} local / {plan.count('retrieval')} retrieval / {plan.count('segment')} segment, "
              f"tp={args.tp} pp={args.pp}")
    else:
        ckpt = checkpoint_settings(args.src)
        segment, plan = resolve_overrides(args, ckpt) or (None, None)
        cfg = export_hf_checkpoint(args.src, args.out, segmented=not args.no_segmentation, dtype=dtype,
                                   tokenizer=args.tokenizer, segment=segment, head_plan=plan)
        kind = "plain Llama" if args.no_segmentation else "segmented (trust_remote_code=True)"
        what = describe(cfg.segment, cfg.head_plan)
        if segment is not None and ckpt.segment is not None:
            what += f"; overridden from the checkpoint's {describe(ckpt.segment, ckpt.plan)}"
        print(f"exported {args.src} -> {args.out} ({kind}): {what}")
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
