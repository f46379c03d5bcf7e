"""Inputs (files, directories, globs) resolved into an ordered list of `Source`s, each a
file of a supported type or one Hugging Face ``save_to_disk`` dataset, by the rules listed
in `megaseg.data.sources`; and `DataError`, the one error type of reading inputs.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
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


def total_bytes(sources: Sequence[Source]) -> int:
    """Bytes on disk of all sources (compressed sizes for compressed files)."""
    return sum(source.size for source in sources)


def describe(sources: Sequence[Source]) -> str:
    """The sources in a few words, for messages: one name, or the first and a count."""
    if len(sources) == 1:
        return sources[0].name
    return f"{sources[0].name} and {len(sources) - 1} more"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
