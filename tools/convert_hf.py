"""Convert between Hugging Face Llama directories and megaseg checkpoints.

    # HF Llama (safetensors or .bin, Llama-2/3 configs) -> megaseg checkpoint (optionally TP/PP shards)
    python tools/convert_hf.py import HF_DIR OUT_DIR --segment-length 4096 --tail-length 512 \\
        --head-plan interleaved --long-range-layers 6,8,11,18 --num-long-heads 8 --tp 2 --pp 2
    python tools/convert_hf.py import HF_DIR OUT_DIR --head-plan paper-llama2-7b

    # megaseg checkpoint -> HF directory loadable with trust_remote_code=True
    python tools/convert_hf.py export CKPT_DIR HF_OUT [--tokenizer PATH] [--dtype bfloat16]
    # ... or a plain Llama directory that stock transformers loads (segmentation off)
    python tools/convert_hf.py export CKPT_DIR HF_OUT --no-segmentation
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.config import ConfigError  # noqa: E402
from megaseg.hf.checkpoint import parse_dtype  # noqa: E402
from megaseg.hf.cli_options import add_segment_options, resolve_segment_options  # noqa: E402
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint, read_hf_config  # noqa: E402
from megaseg.hf.llama_config import CheckpointError, check_architecture, segment_section  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF Llama directory -> megaseg checkpoint directory")
    imp.add_argument("src", help="HF directory (config.json + safetensors or pytorch_model.bin)")
    imp.add_argument("out", help="megaseg checkpoint directory to write")
    imp.add_argument("--dtype", default=None, help="cast weights: float32 | bfloat16 | float16 (default: keep)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    add_segment_options(imp)
    exp = sub.add_parser("export", help="megaseg checkpoint directory -> HF directory")
    exp.add_argument("src", help="megaseg checkpoint directory")
    exp.add_argument("out", help="HF directory to write")
    exp.add_argument("--dtype", default=None, help="cast weights: float32 | bfloat16 | float16 (default: keep)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer directory or .model file (default: the checkpoint's)")
    exp.add_argument("--no-segmentation", action="store_true",
                     help="write a plain Llama config (stock transformers, no remote code)")
    return p


def run(args) -> int:
    dtype = parse_dtype(args.dtype)
    if args.command == "import":
        hf = read_hf_config(args.src)
        check_architecture(hf, args.src)
        base_segment, base_plan = segment_section(hf, args.src)
        layers = int(hf.get("num_hidden_layers") or 0)
        groups = int(hf.get("num_key_value_heads") or hf.get("num_attention_heads") or 0)
        if layers <= 0 or groups <= 0:
            raise CheckpointError(f"{args.src}: config.json needs num_hidden_layers and num_attention_heads")
        segment, plan = resolve_segment_options(args, layers, groups, base_segment, base_plan)
        cfg = import_hf_checkpoint(args.src, args.out, segment, plan, dtype, tp_size=args.tp, pp_size=args.pp)
        print(f"imported {args.src} -> {args.out}: {cfg.num_layers} layers, {cfg.num_heads} heads / "
              f"{cfg.num_kv_heads} KV, S={segment.segment_length} M={segment.tail_length} R={segment.retrieval_length}, "
              f"plan {plan.count('local')} local / {plan.count('retrieval')} retrieval / {plan.count('segment')} segment, "
              f"tp={args.tp} pp={args.pp}")
    else:
        export_hf_checkpoint(args.src, args.out, segmented=not args.no_segmentation, dtype=dtype, tokenizer=args.tokenizer)
        kind = "plain Llama" if args.no_segmentation else "segmented (trust_remote_code=True)"
        print(f"exported {args.src} -> {args.out} ({kind})")
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
