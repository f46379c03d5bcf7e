"""Train a sentencepiece tokenizer (BPE with byte fallback by default), or check one.

    python tools/train_tokenizer.py --input 'corpus/**/*.txt' extra.txt --output-prefix out/tok --vocab-size 4096
    python tools/train_tokenizer.py --input data/corpus.jsonl --output-prefix out/tok   # JSONL: the "text" key
    python tools/train_tokenizer.py --validate out/tok.model

Inputs are files, directories (every file below them) or glob patterns, read in sorted
order; files ending in .jsonl are read as JSON lines and --json-key is taken from each.
Writes <prefix>.model and <prefix>.vocab.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.data.tokenizer import TokenizerError, iter_training_lines, train_tokenizer, validate_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", nargs="+", metavar="PATH", help="text/JSONL files, directories or glob patterns")
    mode.add_argument("--validate", metavar="MODEL", help="check an existing .model and print its summary")
    p.add_argument("--output-prefix", help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="map unseen characters to <unk> instead of UTF-8 byte pieces")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    p.add_argument("--json-key", default="text", help="key read from .jsonl inputs")
    p.add_argument("--threads", type=int, default=2)
    return p


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matched = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            matched = [path]
        else:
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matched:
            raise TokenizerError(f"no input files match {pattern}")
        files.extend(matched)
    return files


def _jsonl_lines(path: Path, key: str):
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TokenizerError(f"{path}:{lineno}: no JSON string under {key!r} ({type(exc).__name__})") from None
            yield from (part for part in text.splitlines() if part.strip())


def training_lines(files: list[Path], json_key: str, max_chars: int | None):
    total = 0
    for path in files:
        lines = _jsonl_lines(path, json_key) if path.suffix == ".jsonl" else iter_training_lines([path])
        for line in lines:
            yield line
            total += len(line)
            if max_chars is not None and total >= max_chars:
                return


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.validate:
            print(validate_tokenizer(args.validate, require_byte_fallback=False).describe())
            return 0
        if not args.output_prefix:
            raise TokenizerError("--output-prefix is required with --input")
        files = expand_inputs(args.input)
        model = train_tokenizer(
            training_lines(files, args.json_key, args.max_chars),
            args.output_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage,
            num_threads=args.threads,
        )
        print(f"trained on {len(files)} file(s); {validate_tokenizer(model, require_byte_fallback=False).describe()}")
        return 0
    except (TokenizerError, OSError) as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
