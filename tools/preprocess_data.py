"""Tokenize documents into megatron-core indexed datasets (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model tok.model --output-prefix data/corpus --append-eod --workers 2
    # writes data/corpus_text_document.bin/.idx; train with the prefix data/corpus_text_document

    # several inputs, any mix of formats, read in order; a Hugging Face tokenizer
    python tools/preprocess_data.py --input shards/*.jsonl.zst books/ extra.parquet \\
        --tokenizer-model hf_tokenizer_dir --tokenizer-type HuggingFaceTokenizer \\
        --output-prefix data/mix --append-bos --append-eod --workers 8 --progress

    # a datasets.save_to_disk DatasetDict (its train split unless --split names another)
    python tools/preprocess_data.py --input saved_dataset --split validation \\
        --tokenizer-model tok.model --output-prefix data/valid --append-eod

The arguments follow Megatron-LM's tools/preprocess_data.py. --input takes files, directories
and globs: .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line), .json (a JSON array of
objects, or JSON lines), .txt (the whole file is one document under the key text), .parquet,
a directory saved by datasets' save_to_disk, and any other directory (every supported file
under it, sorted; a Hub-style folder of train-/test- shards gives its --split, default train).
Each --json-keys entry becomes one dataset of one sequence per document. Errors are one line
and exit with status 2. Formats and flags in detail: docs/data.md.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.data.preprocess import DataError, preprocess_jsonl  # noqa: E402
from megaseg.data.tokenizer import TOKENIZER_TYPES, TokenizerError  # noqa: E402
from megaseg.segment_options import OneLineArgumentParser  # noqa: E402

PROG = "preprocess_data.py"


def build_parser() -> OneLineArgumentParser:
    import argparse

    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="files, directories or globs (.jsonl[.gz|.zst], .json, .txt, .parquet, datasets folders)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="split of a DatasetDict or Hub-style folder (default: train)")
    p.add_argument("--tokenizer-model", required=True,
                   help="sentencepiece .model file, tokenizer.json, or a directory with tokenizer.json")
    p.add_argument("--tokenizer-type", default=None, choices=list(TOKENIZER_TYPES),
                   help="default: inferred from --tokenizer-model")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--append-bos", action="store_true", help="start every document with the bos token")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--progress", action="store_true",
                   help="progress on stderr even when it is not a terminal (default: only on a terminal)")
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
            tokenizer_type=args.tokenizer_type,
            append_bos=args.append_bos,
            split=args.split,
            progress=True if args.progress else None,
        )
    except (DataError, TokenizerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output directory is not writable
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    for key, prefix in result.prefixes.items():
        print(f"{key}: {result.documents} documents, {result.tokens[key]} tokens -> {prefix}.bin/.idx")
    if result.skipped_empty:
        print(f"skipped {result.skipped_empty} empty document(s)")
    print(f"done in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
