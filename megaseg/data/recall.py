"""Training documents with recall in them, written as a megatron-core indexed dataset.

Each document is natural text (the haystack: consecutive lines of the embedded stdlib
corpus, or any text corpus, through the tokenizer given) with recall structure planted in
it, exactly ``length`` tokens long and ending with eod:

* ``passkey``, ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
  ``variable_tracking``: the needles, questions and answers of ``megaseg.eval.tasks``
  (the same templates, ``megaseg.data.haystack``, so training data and the eval
  generators agree); the question is at the end of the document and its answer right
  after it.
* ``mqar``: multi-query associative recall as in Zoology: a block of key/value pairs
  (single-token keys and values of the tokenizer), later a block of queries, each key
  followed by its value.

Placement is controlled in segments: the last token of the (last) target needle lies
``gap`` segment boundaries before the first token of the question, with ``gap`` drawn
uniformly from the feasible values in ``[min_gap_segments, max_gap_segments]``; segments
are ``segment_length`` tokens from the start of the document. With a gap >= 2 and a
carried tail of at most one segment, only retrieval can reach the needle.

Values (pass keys, magic numbers, variable values, MQAR value tokens) are split once,
by a hash of the value's text, into a train and an eval part (``eval_fraction``): train
documents only ever plant train values, ``split="eval"`` documents only eval values.

Every token offset written to the sidecar (``<prefix>_needles.jsonl``) is exact by
construction: each needle, question and answer is encoded in parts (a field such as a
value with its leading space is one part) and the document is the concatenation of those
token ids with the haystack's.

Generation is deterministic in (settings, seed, tokenizer, corpus); files are written
under temporary names and renamed when complete.

This module writes the dataset (`write_recall_dataset`) and is the entry point for the
rest:

    recall_settings.py   `RecallSettings`, `RecallError`, the task names, `value_split`
    recall_pieces.py     token pieces with exact field spans; the MQAR vocabulary
    recall_generator.py  `RecallGenerator`: values and each task's needles and question
    recall_layout.py     one document laid out at exact offsets, and its sidecar record
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaseg.data.recall_generator import RecallGenerator
from megaseg.data.recall_settings import HAYSTACK, RECALL_TASKS, SPLITS, RecallError, RecallSettings
from megaseg.data.tokenizer import validate_tokenizer

__all__ = ["HAYSTACK", "RECALL_TASKS", "SPLITS", "RecallError", "RecallResult", "RecallSettings", "data_prefix_for",
           "needles_path_for", "write_recall_dataset"]


@dataclass
class RecallResult:
    """What `write_recall_dataset` wrote."""

    data_prefix: str
    needles_path: str
    loss_mask_prefix: str | None = None  # with loss_mask: 1 at answer tokens, 0 elsewhere
    documents: int = 0
    tokens: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        counts = ", ".join(f"{task}={n}" for task, n in self.tasks.items())
        mask = f", {self.loss_mask_prefix}.bin/.idx" if self.loss_mask_prefix else ""
        return (f"{self.documents} documents, {self.tokens} tokens ({counts}) -> {self.data_prefix}.bin/.idx, "
                f"{self.needles_path}{mask}")


def needles_path_for(output_prefix: str | Path) -> str:
    return f"{output_prefix}_needles.jsonl"


def data_prefix_for(output_prefix: str | Path) -> str:
    return f"{output_prefix}_text_document"


def loss_mask_prefix_for(output_prefix: str | Path) -> str:
    return f"{output_prefix}_loss_mask_document"


def answer_mask(doc) -> list[int]:
    """1 at the tokens of the document's answers (what recall predicts), 0 elsewhere."""
    mask = [0] * len(doc.ids)
    for span in doc.record["answers"]:
        mask[span["start"]:span["end"]] = [1] * (span["end"] - span["start"])
    return mask


def write_recall_dataset(
    tokenizer_model: str | Path,
    output_prefix: str | Path,
    settings: RecallSettings,
    tokenizer_type: str | None = None,
    log: Callable[[str], None] | None = None,
    log_interval: int = 1000,
    loss_mask: bool = False,
) -> RecallResult:
    """Generate ``settings.documents`` documents with ``tokenizer_model`` (a sentencepiece
    ``.model`` or a Hugging Face tokenizer directory) and write
    ``<prefix>_text_document.bin/.idx`` and ``<prefix>_needles.jsonl``.

    With ``loss_mask``, also ``<prefix>_loss_mask_document.bin/.idx``: the same documents
    with 1 at answer tokens and 0 elsewhere, for pretraining's ``--loss-mask-data-path``.
    Every (task, length) is generated once before anything is written, so a request that
    cannot work fails fast. Raises RecallError / TokenizerError with a one-line message.
    """
    settings.validate()
    if not isinstance(log_interval, int) or log_interval < 1:
        raise RecallError(f"log_interval={log_interval!r} is invalid: must be a positive integer")
    tokenizer = validate_tokenizer(tokenizer_model, require_byte_fallback=False, tokenizer_type=tokenizer_type)
    generator = RecallGenerator(tokenizer, settings, name=str(tokenizer_model))
    _probe(generator)

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    result = RecallResult(data_prefix_for(output_prefix), needles_path_for(output_prefix),
                          loss_mask_prefix_for(output_prefix) if loss_mask else None)
    tmp = f".tmp{os.getpid()}"
    prefixes = [result.data_prefix] + ([result.loss_mask_prefix] if loss_mask else [])
    temps = [(f"{p}{tmp}.bin", f"{p}{tmp}.idx") for p in prefixes]
    jsonl_tmp = f"{result.needles_path}{tmp}"
    builders = [IndexedDatasetBuilder(temps[0][0], dtype=DType.optimal_dtype(tokenizer.vocab_size))]
    if loss_mask:
        builders.append(IndexedDatasetBuilder(temps[1][0], dtype=np.uint8))
    start = time.perf_counter()
    try:
        counts = _write_documents(generator, settings, builders, jsonl_tmp, result, loss_mask, log, log_interval,
                                  start)
        for builder, (_, idx_tmp) in zip(builders, temps):
            builder.finalize(idx_tmp)
        for prefix, (bin_tmp, idx_tmp) in zip(prefixes, temps):
            os.replace(bin_tmp, f"{prefix}.bin")
            os.replace(idx_tmp, f"{prefix}.idx")
        os.replace(jsonl_tmp, result.needles_path)
    finally:
        _discard_partial(builders, [p for pair in temps for p in pair] + [jsonl_tmp])
    result.tasks = {task: counts[task] for task in (*settings.tasks, HAYSTACK) if counts[task]}
    result.seconds = time.perf_counter() - start
    return result


def _write_documents(generator: RecallGenerator, settings: RecallSettings, builders: list, sidecar_path: str,
                     result: RecallResult, loss_mask: bool, log: Callable[[str], None] | None, log_interval: int,
                     start: float) -> Counter[str]:
    """Generate every document into the builders (tokens, then the answer mask with
    ``loss_mask``) and its record into the sidecar at ``sidecar_path``; count documents and
    tokens into ``result``. Returns the documents per task."""
    counts: Counter[str] = Counter()
    with open(sidecar_path, "w", encoding="utf-8") as sidecar:
        for i in range(settings.documents):
            doc = generator.document(i)
            builders[0].add_document(doc.ids, [len(doc.ids)])
            if loss_mask:
                builders[1].add_document(answer_mask(doc), [len(doc.ids)])
            sidecar.write(json.dumps(doc.record, ensure_ascii=False) + "\n")
            counts[doc.record["task"]] += 1
            result.tokens += len(doc.ids)
            result.documents += 1
            if log is not None and (i + 1) % log_interval == 0 and i + 1 < settings.documents:
                rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
                log(f"{i + 1}/{settings.documents} documents, {rate:.0f} docs/s")
    return counts


def _discard_partial(builders: list, paths: list[str]) -> None:
    """Close the builders' data files and remove the temporary files left (none after a
    complete write: they were renamed into place)."""
    for builder in builders:
        if not builder.data_file.closed:
            builder.data_file.close()
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _probe(generator: RecallGenerator) -> None:
    """Generate one document of every (task, length) so that impossible settings fail before
    any output is opened."""
    s = generator.settings
    tasks = (s.tasks if s.haystack_fraction < 1.0 else ()) + ((HAYSTACK,) if s.haystack_fraction > 0.0 else ())
    for task in tasks:
        for length in s.lengths:
            generator.make(-1, task, length, random.Random(f"megaseg-recall-probe:{s.seed}:{task}:{length}"))
