"""Documents out of the files people have: JSONL (plain, .gz, .zst), JSON arrays, .txt
files, parquet, and Hugging Face datasets (``save_to_disk`` directories and Hub-style
folders of parquet/jsonl shards).

`resolve_inputs` turns paths, directories and globs into an ordered list of `Source`s;
`iter_documents` streams one tuple of texts (one per key) per document out of them, and
`count_documents` counts (and so validates) without keeping anything. Nothing here holds
a whole input in memory: JSONL is read line by line, JSON arrays element by element,
parquet and Arrow in row batches.

Each input is one of:

- a file: ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (one JSON object per line),
  ``.json`` (a JSON array of objects; a ``.json`` file that does not start with ``[`` is
  read as JSON lines, as Megatron-LM's preprocess_data.py reads it), ``.txt`` (the whole
  file is one document, its key is ``text``), ``.parquet``;
- a directory saved by `datasets`' ``save_to_disk`` (``state.json``/``dataset_info.json``,
  or ``dataset_dict.json`` for a DatasetDict: its ``train`` split unless ``split`` names
  another);
- any other directory: every supported file under it, recursively, in sorted order; when
  the files are named by split as on the Hugging Face Hub (``data/train-00000-of-00002.parquet``,
  ``test.jsonl``, ``validation/part.parquet``) and there is more than one split, the
  ``train`` split (or ``split``) is taken;
- a glob (``shards/*.jsonl``, ``books/**/*.txt``): the matching files in sorted order.

Every problem is a `DataError` with a one-line message naming the file, and the line (JSON
lines, counted from 1), the element (JSON arrays, from 0) or the row (parquet and
datasets, from 0) where it applies.

This module streams documents out of sources and is the entry point for the rest:

    source_paths.py  `Source`, `DataError`, `resolve_inputs` (the rules above), sizes
    source_text.py   readers of JSON lines, JSON arrays and .txt files
    source_arrow.py  readers of parquet files and save_to_disk datasets
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from megaseg.data.source_arrow import read_parquet, read_saved_dataset
from megaseg.data.source_paths import SUFFIXES, DataError, Source, describe, resolve_inputs, total_bytes
from megaseg.data.source_text import read_json, read_jsonl, read_txt

__all__ = ["SUFFIXES", "DataError", "Source", "count_documents", "describe", "iter_documents", "resolve_inputs",
           "total_bytes"]

_READERS = {"jsonl": read_jsonl, "json": read_json, "txt": read_txt, "parquet": read_parquet,
            "hf_disk": read_saved_dataset}


def _read(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    return _READERS[source.kind](source, keys)


def iter_documents(sources: Sequence[Source], keys: Sequence[str] = ("text",)) -> Iterator[tuple[str, ...]]:
    """One tuple of texts (in ``keys`` order) per document of ``sources``, in order.

    Blank JSON lines are skipped. Raises DataError for a malformed document, and for an
    input (all sources of one ``origin``) that has no documents at all.
    """
    if not keys:
        raise DataError("json_keys is empty: name at least one key, e.g. text")
    keys = list(keys)
    for origin, group in _by_origin(sources):
        count = 0
        for source in group:
            for texts in _read(source, keys):
                count += 1
                yield texts
        if count == 0:
            raise DataError(f"input is empty: {group[0].input or group[0].name} has no documents")


def _by_origin(sources: Sequence[Source]) -> Iterator[tuple[int, list[Source]]]:
    group: list[Source] = []
    for source in sources:
        if group and source.origin != group[0].origin:
            yield group[0].origin, group
            group = []
        group.append(source)
    if group:
        yield group[0].origin, group


def count_documents(sources: Sequence[Source], keys: Sequence[str] = ("text",)) -> int:
    """Number of documents in ``sources``, reading (and so validating) all of them."""
    return sum(1 for _ in iter_documents(sources, keys))
