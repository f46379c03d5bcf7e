"""The text the recall tasks are made of: the haystack (natural filler text from a corpus)
and the templates of the needles and questions planted in it.

One module for both users, below them: the evaluation task generators
(`megaseg.eval.tasks`) and the recall training data (`megaseg.data.recall`, which the
alignment experiment `examples/recall/run.sh` trains on) use the same templates, so
training data and evaluation agree.
No download: the default corpus is the embedded stdlib corpus (`megaseg.data.corpus`).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from megaseg.config import ConfigError
from megaseg.data.corpus import stdlib_documents

PASSKEY_NEEDLE = " The pass key is {value}. Remember it. {value} is the pass key. "
PASSKEY_QUERY = "\nWhat is the pass key? The pass key is"
NIAH_NEEDLE = " The magic number for {key} is {value}. "
NIAH_QUERY = "\nWhat is the magic number for {key}? The magic number for {key} is"
NIAH_MULTI_QUERY = "\nWhat are all the magic numbers for {key}? The magic numbers for {key} are"
VT_FIRST = " VAR {name} = {value}. "
VT_HOP = " VAR {name} = VAR {prev}. "
VT_QUERY = "\nFind all variables that are assigned the value {value}. They are:"
CWE_QUERY = "\nWhat are the {n} most common words in the list above? They are:"
FWE_QUERY = "\nWhat are the {n} most frequent coded words in the text above? They are:"

DEFAULT_CORPUS_BYTES = 4 * 1024 * 1024


class Haystack:
    """Natural filler text cut into lines, encoded lazily with one tokenizer.

    ``lines`` come from a corpus in a fixed order; a haystack of n tokens is consecutive
    lines from a seeded start line (wrapping around once). A corpus that cannot fill a
    request raises ConfigError; so does an empty one.
    """

    def __init__(self, texts: Sequence[str], tokenizer, source: str = "corpus"):
        self.source = source
        self.lines = [ln + "\n" for t in texts for ln in t.splitlines() if ln.strip()]
        if not self.lines:
            raise ConfigError(f"haystack corpus {source!r} is empty: it needs text files with non-blank lines")
        self.tokenizer = tokenizer
        self._cache: dict[int, list[int]] = {}
        words = sorted({w.lower() for t in texts for w in re.findall(r"\b[A-Za-z]{4,9}\b", t)})
        self.words = words

    @classmethod
    def from_source(cls, tokenizer, corpus: str | Path | None = None, max_bytes: int = DEFAULT_CORPUS_BYTES):
        """``corpus``: None or "stdlib" for the embedded corpus, else a directory (all files,
        recursively, sorted) or a single text file."""
        if corpus is None or str(corpus) == "stdlib":
            return cls([d.text for d in stdlib_documents(max_bytes=max_bytes)], tokenizer, "stdlib")
        p = Path(corpus)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
        else:
            raise ConfigError(f"haystack corpus={str(corpus)!r} is invalid: not a file or directory")
        texts, total = [], 0
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if total + len(text) > max_bytes:
                break
            texts.append(text)
            total += len(text)
        return cls(texts, tokenizer, str(corpus))

    def _line(self, i: int) -> list[int]:
        ids = self._cache.get(i)
        if ids is None:
            ids = self._cache[i] = self.tokenizer.encode(self.lines[i], add_bos=False)
        return ids

    def chunks(self, n_tokens: int, rng: random.Random) -> list[list[int]]:
        """Consecutive lines totalling exactly ``n_tokens`` tokens (the last line cut)."""
        if n_tokens <= 0:
            return []
        start = rng.randrange(len(self.lines))
        out, total = [], 0
        for step in range(len(self.lines)):
            ids = self._line((start + step) % len(self.lines))
            take = ids[: n_tokens - total]
            if take:
                out.append(take)
                total += len(take)
            if total == n_tokens:
                return out
        raise ConfigError(
            f"haystack corpus {self.source!r} is too small: {total} tokens in all, a sample needs {n_tokens}; "
            "give a larger corpus or a shorter context length")

    def sample_words(self, n: int, rng: random.Random) -> list[str]:
        if len(self.words) < n:
            raise ConfigError(f"haystack corpus {self.source!r} is too small: it has {len(self.words)} distinct words, "
                              f"the task needs {n}")
        return rng.sample(self.words, n)
