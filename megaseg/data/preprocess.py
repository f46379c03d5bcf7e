"""JSONL documents -> megatron-core indexed datasets (.bin/.idx), one per JSON key.

Output naming follows Megatron-LM's tools/preprocess_data.py: key `text` with prefix
`out/corpus` writes `out/corpus_text_document.bin` and `.idx`, and
`out/corpus_text_document` is the data prefix that training reads. Each JSON line is one
document, stored as one sequence; `append_eod` ends it with the tokenizer's eod id.
The input is checked in full (JSON syntax, keys, string values) before any tokenizing, so
a bad line fails fast; files are written under temporary names and renamed once
complete, so a failed run leaves no half-written dataset behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megaseg.data.tokenizer import SentencePieceTokenizer, validate_tokenizer

_BATCH = 32


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what is wrong."""


@dataclass
class PreprocessResult:
    """What `preprocess_jsonl` wrote."""

    prefixes: dict[str, str] = field(default_factory=dict)  # json key -> data prefix
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # json key -> tokens written
    skipped_empty: int = 0


def output_prefix_for(output_prefix: str | Path, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _read_documents(path: Path, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Yield one tuple of texts (one per key) per non-blank JSON line; DataError on bad lines."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            texts = []
            for key in keys:
                if key not in record:
                    raise DataError(f"{path}:{lineno}: no key {key!r} (keys: {', '.join(sorted(record))})")
                if not isinstance(record[key], str):
                    raise DataError(f"{path}:{lineno}: {key!r} is {type(record[key]).__name__}, expected a string")
                texts.append(record[key])
            yield tuple(texts)


def _batches(documents: Iterator[tuple[str, ...]]) -> Iterator[list[tuple[str, ...]]]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_tokenizer: SentencePieceTokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = SentencePieceTokenizer(model_path)


def _encode_batch(batch: list[tuple[str, ...]]) -> list[list[list[int]]]:
    """Per document, per key: token ids."""
    columns = list(zip(*batch))
    encoded = [_worker_tokenizer.tokenize_batch(column) for column in columns]
    return [list(per_key) for per_key in zip(*encoded)]


def check_input(path: str | Path, json_keys: Sequence[str] = ("text",)) -> int:
    """Number of documents in a JSONL file; DataError if it is missing, empty or malformed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if not path.is_file():
        raise DataError(f"input is not a file: {path}")
    try:
        documents = sum(1 for _ in _read_documents(path, json_keys))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if documents == 0:
        raise DataError(f"input is empty: {path} has no documents")
    return documents


def preprocess_jsonl(
    input_path: str | Path,
    tokenizer_model: str | Path,
    output_prefix: str | Path,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
) -> PreprocessResult:
    """Tokenize every document of a JSONL file into one indexed dataset per key.

    Raises DataError (input) or TokenizerError (model) with a one-line message.
    """
    if not json_keys:
        raise DataError("json_keys is empty: name at least one key, e.g. text")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    input_path = Path(input_path)
    check_input(input_path, json_keys)
    tokenizer = validate_tokenizer(tokenizer_model, require_byte_fallback=False)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    result = PreprocessResult()
    final = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    temporary = {key: f"{prefix}.tmp{os.getpid()}" for key, prefix in final.items()}
    builders = {key: IndexedDatasetBuilder(f"{temporary[key]}.bin", dtype=dtype) for key in json_keys}
    eod = tokenizer.eod
    pool = None
    try:
        batches = _batches(_read_documents(input_path, json_keys))
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(str(tokenizer_model),)
            )
            encoded_batches = pool.imap(_encode_batch, batches)
        else:
            _init_worker(str(tokenizer_model))
            encoded_batches = map(_encode_batch, batches)
        tokens = {key: 0 for key in json_keys}
        for encoded in encoded_batches:
            for per_key in encoded:
                if append_eod:
                    per_key = [ids + [eod] for ids in per_key]
                if any(len(ids) == 0 for ids in per_key):
                    result.skipped_empty += 1
                    continue
                for key, ids in zip(json_keys, per_key):
                    builders[key].add_document(ids, [len(ids)])
                    tokens[key] += len(ids)
                result.documents += 1
        if result.documents == 0:
            raise DataError(f"input has no non-empty documents: {input_path}")
        for key, builder in builders.items():
            builder.finalize(f"{temporary[key]}.idx")
        for key in json_keys:
            for suffix in (".bin", ".idx"):
                os.replace(f"{temporary[key]}{suffix}", f"{final[key]}{suffix}")
        result.prefixes = final
        result.tokens = tokens
        return result
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for key, builder in builders.items():
            if not builder.data_file.closed:
                builder.data_file.close()
            for suffix in (".bin", ".idx"):
                Path(f"{temporary[key]}{suffix}").unlink(missing_ok=True)
