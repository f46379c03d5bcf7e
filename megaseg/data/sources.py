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
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what is wrong."""


SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".txt", ".parquet")
"""File types read, by how the name ends (a directory takes these, recursively)."""

_KIND = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".json": "json", ".txt": "txt",
         ".parquet": "parquet"}
# JSON files a dataset directory holds that are metadata, not documents.
_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}
_SHARD = re.compile(r"^(?P<split>[\w.]+?)-\d{5}-of-\d{5}(?:[.-].*)?$")
_SPLIT_WORDS = ("train", "validation", "valid", "val", "dev", "test", "eval")
_BATCH_ROWS = 1024
_JSON_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One readable unit: a file, or one Hugging Face ``save_to_disk`` dataset.

    ``kind`` is jsonl, json, txt, parquet or hf_disk; ``origin`` indexes the input it came
    from and ``input`` is that input as given (an input that yields no document at all is
    an error).
    """

    path: Path
    kind: str
    origin: int = 0
    label: str = ""
    input: str = ""

    @property
    def name(self) -> str:
        return self.label or str(self.path)

    @property
    def size(self) -> int:
        """Bytes on disk (a save_to_disk directory: its Arrow files)."""
        if self.kind == "hf_disk":
            return sum(p.stat().st_size for p in self.path.glob("*.arrow"))
        return self.path.stat().st_size


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _unsupported(path: Path) -> DataError:
    return DataError(
        f"{path}: unsupported file type (supported: {', '.join(SUFFIXES)}, a directory, a glob, "
        "or a Hugging Face save_to_disk directory)"
    )


def _file_source(path: Path, origin: int) -> Source:
    suffix = _suffix(path)
    if suffix is None:
        raise _unsupported(path)
    return Source(path, _KIND[suffix], origin)


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()


def _saved_dataset_dict(directory: Path, split: str | None, origin: int) -> Source:
    try:
        splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{directory / 'dataset_dict.json'}: not a readable DatasetDict index ({exc})") from None
    chosen = split or "train"
    if chosen not in splits:
        how = "" if split else "; choose one with --split NAME"
        raise DataError(f"{directory}: a DatasetDict without a {chosen!r} split (splits: {', '.join(splits)}){how}")
    if not _is_saved_dataset(directory / chosen):
        raise DataError(f"{directory / chosen}: split {chosen!r} is listed in dataset_dict.json but not saved there")
    return Source(directory / chosen, "hf_disk", origin, label=f"{directory} [{chosen}]")


def _split_of(relative: Path) -> str | None:
    """The split a file of a Hub-style dataset folder belongs to, from its name, or None
    (always None for .txt files: their names are the documents' own)."""
    if _suffix(relative) == ".txt":
        return None
    parts = list(relative.parts)
    name = parts[-1]
    stem = name[: -len(_suffix(relative) or "")] if _suffix(relative) else name
    match = _SHARD.match(stem)
    if match:
        return match["split"]
    for part in parts[:-1] + [stem]:
        lowered = part.lower()
        for word in _SPLIT_WORDS:
            if lowered == word or (lowered.startswith(word) and lowered[len(word)] in "-_. 0123456789"):
                return word
    return None


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root) / name
            if not name.startswith(".") and name not in _METADATA and _suffix(path) is not None:
                found.append(path)
    return sorted(found)


def _directory_sources(directory: Path, split: str | None, origin: int) -> list[Source]:
    if (directory / "dataset_dict.json").is_file():
        return [_saved_dataset_dict(directory, split, origin)]
    if _is_saved_dataset(directory):
        return [Source(directory, "hf_disk", origin)]
    files = _walk(directory)
    if not files:
        raise DataError(f"{directory}: no supported files in this directory (supported: {', '.join(SUFFIXES)})")
    splits = {path: _split_of(path.relative_to(directory)) for path in files}
    names = sorted({s for s in splits.values() if s is not None})
    if len(names) > 1 or (split is not None and names):
        chosen = split or "train"
        if chosen not in names:
            how = "" if split else "; choose one with --split NAME"
            raise DataError(f"{directory}: no {chosen!r} split among its files (splits: {', '.join(names)}){how}")
        files = [path for path in files if splits[path] == chosen]
    return [_file_source(path, origin) for path in files]


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike], split: str | None = None) -> list[Source]:
    """The sources of one or several inputs (files, directories, globs), in order.

    ``split`` chooses the split of a DatasetDict or Hub-style folder (default ``train``).
    Raises DataError for a missing path, a glob matching nothing, an unsupported file type.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise DataError("no input given")
    sources: list[Source] = []
    for origin, item in enumerate(inputs):
        path = Path(item)
        text = str(item)
        if not path.exists() and _is_glob(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"no files match {text}")
            for match in map(Path, matches):
                if match.is_dir():
                    sources.extend(_directory_sources(match, split, origin))
                else:
                    sources.append(_file_source(match, origin))
        elif not path.exists():
            raise DataError(f"input not found: {path}")
        elif path.is_dir():
            sources.extend(_directory_sources(path, split, origin))
        elif path.is_file():
            sources.append(_file_source(path, origin))
        else:
            raise DataError(f"input is not a file or directory: {path}")
    names = [str(item) for item in inputs]
    return [dataclasses.replace(source, input=names[source.origin]) for source in sources]


# ---- reading ------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fields(record: object, keys: Sequence[str], where: str) -> tuple[str, ...]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise DataError(f"{where}: no key {key!r} (keys: {', '.join(sorted(record))})")
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} is {type(value).__name__}, expected a string")
        texts.append(value)
    return tuple(texts)


def _open_binary(source: Source) -> io.BufferedIOBase:
    path = source.path
    name = path.name.lower()
    zstandard = None
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package: pip install zstandard") from None
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if zstandard is not None:
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return handle


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_jsonl(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    path = source.path
    lineno = 0
    try:
        with _open_binary(source) as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                yield _fields(record, keys, f"{path}:{lineno}")
    except _decompression_errors() as exc:
        message = f"corrupt or truncated compressed data after line {lineno} ({_first_line(exc)})"
        raise DataError(f"{path}: {message}") from None


class _JsonText:
    """Decoded text of a JSON file read in chunks, with a position and its line number."""

    def __init__(self, raw: io.BufferedIOBase, path: Path):
        self.raw, self.path = raw, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.line = "", 0, 1
        self.eof, self.read_bytes = False, 0

    def more(self, at_least: int = 1) -> bool:
        """Read at least ``at_least`` more bytes (fewer at the end); False once at the end."""
        if self.eof:
            return False
        parts, got = [], 0
        while got < at_least and not self.eof:
            chunk = self.raw.read(_JSON_CHUNK)
            self.eof = not chunk
            try:
                parts.append(self.decoder.decode(chunk, final=self.eof))
            except UnicodeDecodeError as exc:
                at = self.read_bytes + exc.start
                raise DataError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {at})") from None
            self.read_bytes += len(chunk)
            got += len(chunk)
        self.text = self.text[self.pos:] + "".join(parts)
        self.pos = 0
        return True

    def skip_space(self) -> str:
        """Skip whitespace (reading on as needed); the next character, "" at the end."""
        while True:
            end = _SPACE.match(self.text, self.pos).end()
            self.advance(end)
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]

    def advance(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def error(self, message: str, at: int | None = None) -> DataError:
        line = self.line + (self.text.count("\n", self.pos, at) if at is not None else 0)
        return DataError(f"{self.path}:{line}: {message}")


_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """A JSON array of objects, element by element; JSON lines when it does not start with '['."""
    path = source.path
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    decoder = json.JSONDecoder()
    with raw:
        text = _JsonText(raw, path)
        first = text.skip_space()
        if not first:
            return
        if first != "[":
            yield from _read_jsonl(source, keys)
            return
        text.advance(text.pos + 1)
        index = 0
        while True:
            head = text.skip_space()
            if not head:
                raise text.error("invalid JSON (the array is not closed)")
            if head == "]":
                text.advance(text.pos + 1)
                if text.skip_space():
                    raise text.error("invalid JSON (extra data after the array)")
                return
            if index:
                if head != ",":
                    raise text.error(f"invalid JSON (expected ',' or ']' after element {index - 1})")
                text.advance(text.pos + 1)
                if not text.skip_space():
                    raise text.error("invalid JSON (the array is not closed)")
            while True:
                try:
                    record, end = decoder.raw_decode(text.text, text.pos)
                except json.JSONDecodeError as exc:
                    # Incomplete, or invalid: read on, doubling what is buffered (so a long
                    # element parses in linear time), and fail once the file is exhausted.
                    if text.more(at_least=max(1, len(text.text) - text.pos)):
                        continue
                    raise text.error(f"invalid JSON in element {index} ({exc.msg})", exc.pos) from None
                # A bare number or literal may continue in the next chunk: parse it again.
                if end == len(text.text) and not isinstance(record, (dict, list, str)) and text.more():
                    continue
                break
            where = f"{path}:{text.line}: element {index}"
            text.advance(end)
            yield _fields(record, keys, where)
            index += 1


def _read_txt(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    path = source.path
    if any(key != "text" for key in keys):
        raise DataError(f"{path}: a .txt file is one document under the key 'text'; "
                        f"json keys {list(keys)} ask for others")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    yield (text.removeprefix("\ufeff"),) * len(keys)


def _check_string_column(path: object, key: str, names: Sequence[str], arrow_type) -> None:
    import pyarrow as pa

    if key not in names:
        raise DataError(f"{path}: no column {key!r} (columns: {', '.join(names)})")

    def is_string(t) -> bool:
        view = getattr(pa.types, "is_string_view", lambda _: False)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t)

    if not (is_string(arrow_type) or (pa.types.is_dictionary(arrow_type) and is_string(arrow_type.value_type))):
        raise DataError(f"{path}: column {key!r} is {arrow_type}, expected a string")


def _rows(path: object, keys: Sequence[str], columns: Iterator[dict[str, list]]) -> Iterator[tuple[str, ...]]:
    """Per row, the values of ``keys`` out of batches of columns; DataError for a non-string."""
    row = 0
    for batch in columns:
        values = [batch[key] for key in keys]
        for texts in zip(*values):
            for key, text in zip(keys, texts):
                if not isinstance(text, str):
                    raise DataError(f"{path}: row {row}: {key!r} is {'null' if text is None else type(text).__name__}, "
                                    "expected a string")
            yield texts
            row += 1


def _read_parquet(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    path = source.path
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the pyarrow package: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    with parquet:
        schema = parquet.schema_arrow
        for key in keys:
            _check_string_column(path, key, schema.names, schema.field(key).type if key in schema.names else None)
        unique = list(dict.fromkeys(keys))
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=unique)
        try:
            yield from _rows(path, keys, ({k: b.column(k).to_pylist() for k in unique} for b in batches))
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: corrupt parquet data ({_first_line(exc)})") from None


def _read_saved_dataset(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{source.name}: a Hugging Face save_to_disk dataset needs the datasets package: "
                        "pip install datasets") from None
    try:
        dataset = load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{source.name}: not a readable save_to_disk dataset ({_first_line(exc)})") from None
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        raise DataError(f"{source.name}: a DatasetDict; pass its directory (with dataset_dict.json) instead")
    names = list(dataset.column_names)
    arrow_schema = dataset.data.schema
    for key in keys:
        _check_string_column(source.name, key, names, arrow_schema.field(key).type if key in names else None)
    unique = list(dict.fromkeys(keys))
    columns = dataset.select_columns(unique).with_format(None)
    yield from _rows(source.name, keys, columns.iter(batch_size=_BATCH_ROWS))


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "txt": _read_txt, "parquet": _read_parquet,
            "hf_disk": _read_saved_dataset}


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


def total_bytes(sources: Sequence[Source]) -> int:
    """Bytes on disk of all sources (compressed sizes for compressed files)."""
    return sum(source.size for source in sources)


def describe(sources: Sequence[Source]) -> str:
    """The sources in a few words, for messages: one name, or the first and a count."""
    if len(sources) == 1:
        return sources[0].name
    return f"{sources[0].name} and {len(sources) - 1} more"
