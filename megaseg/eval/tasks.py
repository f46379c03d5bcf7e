"""Long-context task generators: passkey, needle-in-a-haystack, variable tracking, CWE, FWE.

No download: the haystack is natural text from a corpus (the embedded stdlib corpus by
default, or any directory of text files). Generation is deterministic in (task, length,
seed, tokenizer, corpus) and works with any tokenizer offering ``encode(text, add_bos)``
(the megaseg ``TextTokenizer`` and ``ByteTokenizer`` both do).

A sample is a prompt of token ids followed by gold answer ids; prompt + answer is exactly
``length`` tokens. The haystack fills whatever the task's own text leaves. Scoring follows
RULER's ``string_match_all``: the fraction of gold references found (as whole words) in the
predicted answer text.

Templates are kept short so that small byte-level models can run them at a few hundred
tokens; they and the haystack live in ``megaseg.data.haystack``, where the recall training
data (``megaseg.data.recall``) takes the same ones.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from megaseg.config import ConfigError
from megaseg.data.haystack import (
    CWE_QUERY, FWE_QUERY, NIAH_MULTI_QUERY, NIAH_NEEDLE, NIAH_QUERY, PASSKEY_NEEDLE, PASSKEY_QUERY, VT_FIRST, VT_HOP,
    VT_QUERY, Haystack,
)

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "cwe", "fwe")


@dataclass
class Sample:
    """One task instance: ``input_ids`` (prompt, with BOS when the tokenizer has one) then
    ``answer_ids``; ``references`` are the strings scoring looks for in the prediction."""

    task: str
    length: int
    seed: int
    input_ids: list[int]
    answer_ids: list[int]
    answer: str
    references: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.input_ids + self.answer_ids


def score(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` as whole words (RULER string_match_all)."""
    if not references:
        return 0.0
    hits = sum(bool(re.search(rf"(?<![0-9A-Za-z_]){re.escape(r)}(?![0-9A-Za-z_])", prediction)) for r in references)
    return hits / len(references)


# ---- generation ----------------------------------------------------------------------------
def _digits(rng: random.Random, n: int = 5) -> str:
    return str(rng.randrange(10 ** (n - 1), 10 ** n))


def _letters(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


class _Builder:
    """Prompt = BOS + haystack with needles at depths + tail text (the question); answer ids after it."""

    def __init__(self, task: str, length: int, seed: int, tokenizer, haystack: Haystack):
        self.task, self.length, self.seed = task, length, seed
        self.tok, self.haystack = tokenizer, haystack
        self.rng = random.Random(f"{task}:{length}:{seed}")

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False)

    def build(self, needles: Sequence[str], tail: str, answer: str, references: list[str], depths=None,
              meta=None) -> Sample:
        bos = [self.tok.bos_id] if getattr(self.tok, "bos_id", None) is not None else []
        needle_ids = [self.enc(n) for n in needles]
        tail_ids, answer_ids = self.enc(tail), self.enc(answer)
        fixed = len(bos) + sum(map(len, needle_ids)) + len(tail_ids) + len(answer_ids)
        budget = self.length - fixed
        if budget < 0:
            raise ConfigError(f"length={self.length} is invalid for task {self.task!r}: it needs at least {fixed} tokens")
        lines = self.haystack.chunks(budget, self.rng)
        if depths is None:
            depths = sorted(self.rng.random() for _ in needles)
        # Insert each needle at the line boundary nearest its depth (fraction of the haystack).
        cum, bounds = 0, [0]
        for ln in lines:
            cum += len(ln)
            bounds.append(cum)
        at = [min(range(len(bounds)), key=lambda b: abs(bounds[b] - d * budget)) for d in depths]
        body: list[int] = []
        inserted = sorted(zip(at, range(len(needle_ids))))
        k = 0
        for li in range(len(lines) + 1):
            while k < len(inserted) and inserted[k][0] == li:
                body += needle_ids[inserted[k][1]]
                k += 1
            if li < len(lines):
                body += lines[li]
        prompt = bos + body + tail_ids
        assert len(prompt) + len(answer_ids) == self.length
        m = {"depths": [round(d, 4) for d in depths]}
        m.update(meta or {})
        return Sample(self.task, self.length, self.seed, prompt, answer_ids, answer, references, m)


def _passkey(b: _Builder) -> Sample:
    v = _digits(b.rng)
    return b.build([PASSKEY_NEEDLE.format(value=v)], PASSKEY_QUERY, f" {v}.", [v])


def _niah(b: _Builder, n_keys: int, n_values: int) -> Sample:
    keys = b.haystack.sample_words(n_keys, b.rng)
    target = keys[0]
    values = {k: [_digits(b.rng) for _ in range(n_values if k == target else 1)] for k in keys}
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
    b.rng.shuffle(needles)
    if n_values == 1:
        v = values[target][0]
        return b.build(needles, NIAH_QUERY.format(key=target), f" {v}.", [v], meta={"key": target})
    # Needles appear in list order (depths are sorted): the gold lists values as they appear.
    vs = [v for n in needles for v in values[target] if n == NIAH_NEEDLE.format(key=target, value=v)]
    return b.build(needles, NIAH_MULTI_QUERY.format(key=target), " " + ", ".join(vs) + ".", vs, meta={"key": target})


def _variable_tracking(b: _Builder, hops: int = 4, chains: int = 2) -> Sample:
    names = set()
    while len(names) < hops * chains:
        names.add(_letters(b.rng))
    names = sorted(names)
    b.rng.shuffle(names)
    values = []
    while len(values) < chains:
        v = _digits(b.rng)
        if v not in values:
            values.append(v)
    needles, depths = [], []
    for c in range(chains):
        chain = names[c * hops:(c + 1) * hops]
        ds = sorted(b.rng.random() for _ in chain)
        for i, name in enumerate(chain):
            needles.append(VT_FIRST.format(name=name, value=values[c]) if i == 0 else VT_HOP.format(name=name, prev=chain[i - 1]))
            depths.append(ds[i])
    gold = names[:hops]
    return b.build(needles, VT_QUERY.format(value=values[0]), " " + " ".join(gold) + ".", gold, depths=depths,
                   meta={"value": values[0]})


def _cwe(b: _Builder, n_answer: int = 5, common_freq: int = 6, uncommon_freq: int = 2) -> Sample:
    """RULER common-words extraction: a word list where n_answer words appear common_freq
    times and others uncommon_freq times; natural text before the list fills the rest."""
    budget = int(b.length * 0.5)
    words = b.haystack.sample_words(min(len(b.haystack.words), n_answer + max(4, budget)), b.rng)
    common = words[:n_answer]
    pool = list(common) * common_freq
    used = sum(len(b.enc(f" {w}")) for w in pool)
    for w in words[n_answer:]:
        cost = len(b.enc(f" {w}")) * uncommon_freq
        if used + cost > budget:
            break
        pool += [w] * uncommon_freq
        used += cost
    b.rng.shuffle(pool)
    gold = sorted(common)
    return b.build([], "\nList:" + "".join(f" {w}" for w in pool) + "." + CWE_QUERY.format(n=n_answer),
                   " " + " ".join(gold) + ".", gold,
                   meta={"common_freq": common_freq, "uncommon_freq": uncommon_freq, "listed": len(pool)})


def _fwe(b: _Builder, n_answer: int = 3, vocab: int = 12, alpha: float = 1.5) -> Sample:
    """RULER frequent-words extraction: coded words with Zipf counts scattered through
    natural text (each as its own needle); the answer is the n_answer most frequent."""
    coded = set()
    while len(coded) < vocab:
        coded.add(_letters(b.rng, 4).lower())
    coded = sorted(coded)
    b.rng.shuffle(coded)
    word_tokens = max(len(b.enc(f" {w}")) for w in coded)
    # Counts ~ 1/(i+1)^alpha scaled to about a quarter of the context, top n_answer distinct.
    total_budget = max(vocab * 2, int(b.length * 0.25 / max(word_tokens, 1)))
    weights = [1 / (i + 1) ** alpha for i in range(vocab)]
    counts = [max(1, int(total_budget * w / sum(weights))) for w in weights]
    for i in range(n_answer - 1, -1, -1):  # keep the top counts strictly decreasing
        counts[i] = max(counts[i], counts[i + 1] + 1)
    needles = [f" {w}" for w, c in zip(coded, counts) for _ in range(c)]
    b.rng.shuffle(needles)
    gold = coded[:n_answer]
    return b.build(needles, FWE_QUERY.format(n=n_answer), " " + " ".join(gold) + ".", gold,
                   meta={"counts": dict(zip(coded, counts))})


_GENERATORS: dict[str, Callable[[_Builder], Sample]] = {
    "passkey": _passkey,
    "niah_single": lambda b: _niah(b, 1, 1),
    "niah_multikey": lambda b: _niah(b, 4, 1),
    "niah_multivalue": lambda b: _niah(b, 1, 4),
    "variable_tracking": _variable_tracking,
    "cwe": _cwe,
    "fwe": _fwe,
}


def check_task(name: str) -> str:
    if name not in _GENERATORS:
        raise ConfigError(f"task={name!r} is invalid: known tasks are {', '.join(TASKS)}")
    return name


def generate(task: str, length: int, seed: int, tokenizer, haystack: Haystack) -> Sample:
    """One deterministic sample of ``task`` with exactly ``length`` tokens."""
    check_task(task)
    if not isinstance(length, int) or length <= 0:
        raise ConfigError(f"length={length!r} is invalid: must be a positive integer")
    return _GENERATORS[task](_Builder(task, length, seed, tokenizer, haystack))


def generate_many(task: str, length: int, n: int, tokenizer, haystack: Haystack, seed: int = 0) -> list[Sample]:
    return [generate(task, length, seed * 100003 + i, tokenizer, haystack) for i in range(n)]
