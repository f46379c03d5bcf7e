"""Readers of the text formats: JSON lines (plain, .gz, .zst), JSON arrays and .txt
files. Each yields one tuple of texts (one per key) per document, streaming: JSONL line by
line, JSON arrays element by element (in chunks of `_JSON_CHUNK` bytes). A ``.json``
file that does not start with ``[`` is read as JSON lines, as Megatron-LM's
preprocess_data.py reads it; a ``.txt`` file is one document under the key ``text``.

Errors name the file and the line (JSON lines, counted from 1) or the element (JSON
arrays, from 0).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from megaseg.data.source_paths import DataError, Source, first_line

_JSON_CHUNK = 1 << 20


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


def read_jsonl(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
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
        message = f"corrupt or truncated compressed data after line {lineno} ({first_line(exc)})"
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


def read_json(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
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
            yield from read_jsonl(source, keys)
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


def read_txt(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
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
