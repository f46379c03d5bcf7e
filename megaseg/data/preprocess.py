"""Documents -> megatron-core indexed datasets (.bin/.idx), one per JSON key.

Output naming follows Megatron-LM's tools/preprocess_data.py: key `text` with prefix
`out/corpus` writes `out/corpus_text_document.bin` and `.idx`, and
`out/corpus_text_document` is the data prefix that training reads. Each document is
stored as one sequence; `append_eod` ends it with the tokenizer's eod id.

The input is one or several files, directories or globs in any format
`megaseg.data.sources` reads (JSONL plain/.gz/.zst, JSON arrays, .txt, parquet, Hugging
Face datasets). An input of at most `PRECHECK_BYTES` on disk is checked in full (JSON
syntax, keys, string values) before any tokenizing, so a bad line fails fast; a larger
one is checked while it streams. Either way files are written under temporary names and
renamed once complete, so a failed run leaves no half-written dataset behind.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megaseg.data.sources import (
    DataError,
    count_documents,
    describe,
    iter_documents,
    resolve_inputs,
    total_bytes,
)
from megaseg.data.tokenizer import load_tokenizer, validate_tokenizer

__all__ = ["DataError", "PreprocessResult", "check_input", "output_prefix_for", "preprocess", "preprocess_jsonl"]

_BATCH = 32
PRECHECK_BYTES = 64 << 20
"""Inputs up to this size on disk are validated in full before tokenizing."""


@dataclass
class PreprocessResult:
    """What `preprocess_jsonl` wrote."""

    prefixes: dict[str, str] = field(default_factory=dict)  # json key -> data prefix
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # json key -> tokens written
    skipped_empty: int = 0


def output_prefix_for(output_prefix: str | Path, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _read_documents(path: str | Path, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """One tuple of texts (one per key) per document of ``path``; DataError on bad input."""
    return iter_documents(resolve_inputs(path), keys)


def _batches(documents: Iterator[tuple[str, ...]]) -> Iterator[list[tuple[str, ...]]]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_tokenizer = None


def _init_worker(model_path: str, tokenizer_type: str | None = None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model_path, tokenizer_type)


def _encode_batch(batch: list[tuple[str, ...]]) -> list[list[list[int]]]:
    """Per document, per key: token ids."""
    columns = list(zip(*batch))
    encoded = [_worker_tokenizer.tokenize_batch(column) for column in columns]
    return [list(per_key) for per_key in zip(*encoded)]


class _Encoder:
    """Encodes batches in order, in this process or in ``workers`` forked processes.

    Batches are read here, in the calling thread (so a bad document raises where it is
    read), and at most a few per worker are in flight.
    """

    def __init__(self, model_path: str, tokenizer_type: str | None, workers: int):
        self.pool = None
        self.workers = workers
        if workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(model_path, tokenizer_type)
            )
        else:
            _init_worker(model_path, tokenizer_type)

    def encode(self, batches: Iterator[list[tuple[str, ...]]]) -> Iterator[tuple[int, list[list[list[int]]]]]:
        """(documents in the batch, per document per key token ids) for every batch."""
        if self.pool is None:
            for batch in batches:
                yield len(batch), _encode_batch(batch)
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), self.pool.apply_async(_encode_batch, (batch,))))
            if len(pending) >= 4 * self.workers:
                size, result = pending.popleft()
                yield size, result.get()
        while pending:
            size, result = pending.popleft()
            yield size, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class _Progress:
    """Documents and tokens per second on stderr: a tqdm bar when tqdm is importable, else
    a plain line every ``interval`` seconds. ``enabled=None``: only when stderr is a TTY."""

    def __init__(self, enabled: bool | None, total: int | None = None, interval: float = 5.0, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.interval = interval
        self.documents = self.tokens = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit=" documents", file=self.stream, dynamic_ncols=True, mininterval=1.0)

    def update(self, documents: int, tokens: int) -> None:
        if not self.enabled:
            return
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            if now - self.last >= 1.0:
                self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                self.last = now
            self.bar.update(documents)
        elif now - self.last >= self.interval:
            self.last = now
            elapsed = now - self.start
            print(
                f"preprocess: {self.documents:,} documents, {self.tokens:,} tokens in {elapsed:.0f}s "
                f"({self.documents / elapsed:,.0f} documents/s, {rate:,.0f} tokens/s)",
                file=self.stream,
                flush=True,
            )

    def close(self, success: bool) -> None:
        if self.bar is not None:
            self.bar.leave = success  # on failure, clear the bar so the error line stands alone
            self.bar.close()
            self.bar = None


def check_input(
    inputs: str | Path | Sequence[str | Path], json_keys: Sequence[str] = ("text",), split: str | None = None
) -> int:
    """Number of documents in one or several inputs (files, directories, globs), reading all of
    them once without keeping them; DataError if one is missing, empty or malformed."""
    return count_documents(resolve_inputs(inputs, split), json_keys)


def preprocess_jsonl(
    input_path: str | Path | Sequence[str | Path],
    tokenizer_model: str | Path,
    output_prefix: str | Path,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    tokenizer_type: str | None = None,
    append_bos: bool = False,
    *,
    split: str | None = None,
    progress: bool | None = False,
) -> PreprocessResult:
    """Tokenize every document of one or several inputs into one indexed dataset per key.

    ``input_path`` is a path (file, directory or glob; see `megaseg.data.sources`) or a list
    of them, read in order. ``tokenizer_model`` is a sentencepiece ``.model`` or a Hugging
    Face tokenizer (a directory with ``tokenizer.json``, or that file); ``append_bos``
    starts every document with the tokenizer's bos (an error when it has none),
    ``append_eod`` ends it with eod. ``split`` picks the split of a DatasetDict or a
    Hub-style folder (default train). ``progress`` writes a progress line to stderr (None:
    when stderr is a TTY).

    Raises DataError (input) or TokenizerError (model) with a one-line message.
    """
    if not json_keys:
        raise DataError("json_keys is empty: name at least one key, e.g. text")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    json_keys = list(json_keys)
    sources = resolve_inputs(input_path, split)
    total = None
    if total_bytes(sources) <= PRECHECK_BYTES:
        total = count_documents(sources, json_keys)
    tokenizer = validate_tokenizer(tokenizer_model, require_byte_fallback=False, tokenizer_type=tokenizer_type)
    bos = _bos(tokenizer) if append_bos else None
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    outputs = _Outputs(output_prefix, json_keys, tokenizer.vocab_size)
    eod = tokenizer.eod
    encoder = None
    meter = _Progress(progress, total)
    success = False
    try:
        encoder = _Encoder(str(tokenizer_model), tokenizer_type, workers)
        batches = encoder.encode(_batches(iter_documents(sources, json_keys)))
        result = _write_documents(batches, outputs, bos, eod if append_eod else None, meter)
        if result.documents == 0:
            raise DataError(f"input has no non-empty documents: {describe(sources)}")
        outputs.commit()
        result.prefixes = outputs.final
        success = True
        return result
    finally:
        meter.close(success)
        if encoder is not None:
            encoder.close()
        outputs.close()


def _bos(tokenizer) -> int:
    try:
        return tokenizer.bos
    except AttributeError as exc:
        raise DataError(f"append_bos=True is invalid: {exc}") from None


class _Outputs:
    """One megatron-core IndexedDatasetBuilder per json key, writing under a temporary name
    (``<data prefix>.tmp<pid>.bin/.idx``) until `commit` renames the files into place."""

    def __init__(self, output_prefix: str | Path, json_keys: list[str], vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        dtype = DType.optimal_dtype(vocab_size)
        self.keys = json_keys
        self.final = {key: output_prefix_for(output_prefix, key) for key in json_keys}
        self.temporary = {key: f"{prefix}.tmp{os.getpid()}" for key, prefix in self.final.items()}
        self.builders = {key: IndexedDatasetBuilder(f"{self.temporary[key]}.bin", dtype=dtype) for key in json_keys}

    def add(self, per_key: list[list[int]]) -> None:
        """Add one document: its token ids under each key."""
        for key, ids in zip(self.keys, per_key):
            self.builders[key].add_document(ids, [len(ids)])

    def commit(self) -> None:
        for key, builder in self.builders.items():
            builder.finalize(f"{self.temporary[key]}.idx")
        for key in self.keys:
            for suffix in (".bin", ".idx"):
                os.replace(f"{self.temporary[key]}{suffix}", f"{self.final[key]}{suffix}")

    def close(self) -> None:
        """Close the files and remove whatever temporary file is left (all of them after a failure)."""
        for key, builder in self.builders.items():
            if not builder.data_file.closed:
                builder.data_file.close()
            for suffix in (".bin", ".idx"):
                Path(f"{self.temporary[key]}{suffix}").unlink(missing_ok=True)


def _write_documents(batches: Iterator[tuple[int, list[list[list[int]]]]], outputs: _Outputs, bos: int | None,
                     eod: int | None, meter: _Progress) -> PreprocessResult:
    """Every encoded document into ``outputs``: bos first and eod last when given; a
    document empty under some key is skipped (and counted)."""
    result = PreprocessResult()
    tokens = {key: 0 for key in outputs.keys}
    for size, encoded in batches:
        batch_tokens = 0
        for per_key in encoded:
            if bos is not None:
                per_key = [[bos] + ids if ids else ids for ids in per_key]
            if eod is not None:
                per_key = [ids + [eod] if len(ids) > (bos is not None) else ids for ids in per_key]
            if any(len(ids) == 0 for ids in per_key):
                result.skipped_empty += 1
                continue
            outputs.add(per_key)
            for key, ids in zip(outputs.keys, per_key):
                tokens[key] += len(ids)
                batch_tokens += len(ids)
            result.documents += 1
        meter.update(size, batch_tokens)
    result.tokens = tokens
    return result


preprocess = preprocess_jsonl
"""The same function under a name that does not suggest JSONL only."""
