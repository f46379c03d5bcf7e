"""Tokenize JSONL documents into megatron-core indexed datasets (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model tok.model --output-prefix data/corpus --append-eod --workers 2
    # writes data/corpus_text_document.bin/.idx; train with the prefix data/corpus_text_document

The arguments follow Megatron-LM's tools/preprocess_data.py. Each line of --input is a
JSON object; each --json-keys entry becomes one dataset of one sequence per document.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.data.preprocess import DataError, preprocess_jsonl  # noqa: E402
from megaseg.data.tokenizer import TokenizerError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=["SentencePieceTokenizer"],
                   help="accepted for Megatron-LM compatibility; sentencepiece is the only type")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\.")
    start = time.perf_counter()
    try:
        result = preprocess_jsonl(
            args.input,
            args.tokenizer_model,
            args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
        )
    except (DataError, TokenizerError) as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    for key, prefix in result.prefixes.items():
        print(f"{key}: {result.documents} documents, {result.tokens[key]} tokens -> {prefix}.bin/.idx")
    if result.skipped_empty:
        print(f"skipped {result.skipped_empty} empty document(s)")
    print(f"done in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
