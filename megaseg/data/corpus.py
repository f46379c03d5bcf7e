"""The embedded default corpus: the Python standard library's own source files.

Needs no download: every Python install carries it. One document per `.py` file, in
sorted order of the path relative to the stdlib directory, so the corpus is the same on
every machine with the same Python version. Source files are long (the default minimum of
16 KiB is several thousand tokens), so segmented attention sees documents that span many
segments. Installed third-party packages (site-packages, dist-packages) are excluded.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIN_BYTES = 16 * 1024
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One corpus document: `name` is the path relative to the stdlib directory."""

    name: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(min_bytes: int = DEFAULT_MIN_BYTES) -> list[Path]:
    """All stdlib `.py` files of at least `min_bytes`, sorted by relative path."""
    root = stdlib_dir()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        for name in names:
            path = Path(directory, name)
            if name.endswith(".py") and path.is_file() and path.stat().st_size >= min_bytes:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(
    min_bytes: int = DEFAULT_MIN_BYTES,
    max_bytes: int | None = None,
    max_documents: int | None = None,
) -> Iterator[Document]:
    """The stdlib corpus, one document per file, in deterministic order.

    Args:
        min_bytes: skip files smaller than this (keeps documents long).
        max_bytes: stop before the total UTF-8 size would exceed this (None: no cap).
        max_documents: stop after this many documents (None: no cap).

    Files that are not valid UTF-8 (a few test fixtures) are skipped.
    """
    root = stdlib_dir()
    total = 0
    count = 0
    for path in stdlib_source_files(min_bytes):
        if max_documents is not None and count >= max_documents:
            return
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if max_bytes is not None and total + len(raw) > max_bytes:
            return
        total += len(raw)
        count += 1
        yield Document(path.relative_to(root).as_posix(), text)


def write_jsonl(documents: Iterable[Document | str], path: str | Path) -> int:
    """Write `{"text": ...}` lines; returns the number of documents written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for document in documents:
            text = document.text if isinstance(document, Document) else document
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count
