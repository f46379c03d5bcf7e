"""Prepare the embedded default dataset: Python stdlib sources -> tokenizer -> indexed dataset.

    python tools/prepare_default_data.py --output-dir data/default
    # data/default/tokenizer.model and data/default/stdlib_text_document.{bin,idx}

Needs no download. Run again and it returns at once if the directory is already complete
with the same settings.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.data.default_data import DefaultDataSettings, prepare_default_data  # noqa: E402
from megaseg.data.preprocess import DataError  # noqa: E402
from megaseg.data.tokenizer import TokenizerError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    defaults = DefaultDataSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--output-dir", default="data/default")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--tokenizer-train-chars", type=int, default=defaults.tokenizer_train_chars,
                   help="characters of the corpus the tokenizer is trained on")
    p.add_argument("--min-bytes", type=int, default=defaults.min_bytes, help="skip source files smaller than this")
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes, help="cap on the corpus size (default: none)")
    p.add_argument("--workers", type=int, default=2)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\.")
    settings = DefaultDataSettings(
        vocab_size=args.vocab_size,
        tokenizer_train_chars=args.tokenizer_train_chars,
        min_bytes=args.min_bytes,
        max_bytes=args.max_bytes,
    )
    start = time.perf_counter()
    try:
        data = prepare_default_data(args.output_dir, settings, workers=args.workers)
    except (DataError, TokenizerError, ValueError, OSError) as exc:
        print(f"prepare_default_data.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"tokenizer model: {data.tokenizer_model}")
    print(f"data prefix:     {data.data_prefix}  ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
