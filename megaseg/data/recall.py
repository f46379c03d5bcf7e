"""Training documents with recall in them, written as a megatron-core indexed dataset.

Each document is natural text (the haystack: consecutive lines of the embedded stdlib
corpus, or any text corpus, through the tokenizer given) with recall structure planted in
it, exactly ``length`` tokens long and ending with eod:

* ``passkey``, ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
  ``variable_tracking``: the needles, questions and answers of ``megaseg.eval.tasks``
  (the same templates, so training data and the eval generators agree); the question is
  at the end of the document and its answer right after it.
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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megaseg.config import ConfigError
from megaseg.data.tokenizer import validate_tokenizer
from megaseg.eval.tasks import (
    NIAH_MULTI_QUERY,
    NIAH_NEEDLE,
    NIAH_QUERY,
    PASSKEY_NEEDLE,
    PASSKEY_QUERY,
    VT_FIRST,
    VT_HOP,
    VT_QUERY,
    Haystack,
)

RECALL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "mqar", "copy")
HAYSTACK = "haystack"  # the task name of a plain-text document (no recall structure)
SPLITS = ("train", "eval")

# MQAR candidates: a word of 2-12 letters or a 2-3 digit number, optionally with a leading
# space, that the tokenizer encodes as exactly that one id.
_MQAR_TOKEN = re.compile(r" ?(?:[A-Za-z]{2,12}|[0-9]{2,3})")
_MQAR_PREFER_SPACED = 64  # use only " word" forms when the tokenizer has at least this many


class RecallError(ConfigError):
    """A recall-data request that cannot work; one line that names the setting and why."""


# ---- settings ----------------------------------------------------------------------------------
@dataclass
class RecallSettings:
    """What `write_recall_dataset` generates. ``lengths``: one length for every document,
    or several, each document drawing one."""

    tasks: Sequence[str] = ("passkey", "mqar", "variable_tracking")
    documents: int = 1000
    lengths: Sequence[int] = (1024,)
    segment_length: int = 256
    min_gap_segments: int = 1
    max_gap_segments: int = 3
    haystack_fraction: float = 0.0
    seed: int = 1234
    split: str = "train"
    eval_fraction: float = 0.1
    mqar_pairs: int = 16
    mqar_queries: int = 8
    copy_length: int = 32
    vt_hops: int = 4
    vt_chains: int = 2
    append_bos: bool = False
    corpus: str | None = None  # None / "stdlib": the embedded corpus; else a text file or directory
    corpus_bytes: int = 4 * 1024 * 1024

    def validate(self) -> "RecallSettings":
        self.tasks = tuple(self.tasks)
        self.lengths = tuple(self.lengths)
        if not self.tasks:
            raise RecallError("tasks is empty: name at least one of " + ", ".join(RECALL_TASKS))
        for task in self.tasks:
            if task not in RECALL_TASKS:
                raise RecallError(f"task={task!r} is invalid: recall tasks are {', '.join(RECALL_TASKS)}")
        _positive_int("documents", self.documents)
        _positive_int("segment_length", self.segment_length)
        if not self.lengths:
            raise RecallError("lengths is empty: give at least one document length")
        for length in self.lengths:
            if not isinstance(length, int) or isinstance(length, bool) or length < 2:
                raise RecallError(f"length={length!r} is invalid: must be an integer >= 2")
        for name in ("min_gap_segments", "max_gap_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RecallError(f"{name}={value!r} is invalid: must be an integer >= 0")
        if self.min_gap_segments > self.max_gap_segments:
            raise RecallError(f"min_gap_segments={self.min_gap_segments} is invalid: "
                              f"larger than max_gap_segments={self.max_gap_segments}")
        for length in self.lengths:
            most = (length - 1) // self.segment_length
            if self.min_gap_segments > most:
                raise RecallError(
                    f"min_gap_segments={self.min_gap_segments} is larger than the document allows: "
                    f"length={length} with segment_length={self.segment_length} has at most {most} "
                    "segment boundaries")
        longest = max(self.lengths)
        if self.max_gap_segments > (longest - 1) // self.segment_length:
            raise RecallError(
                f"max_gap_segments={self.max_gap_segments} is larger than the document allows: "
                f"length={longest} with segment_length={self.segment_length} has at most "
                f"{(longest - 1) // self.segment_length} segment boundaries")
        if not 0.0 <= self.haystack_fraction <= 1.0:
            raise RecallError(f"haystack_fraction={self.haystack_fraction!r} is invalid: must be in [0, 1]")
        if self.split not in SPLITS:
            raise RecallError(f"split={self.split!r} is invalid: must be train or eval")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise RecallError(f"eval_fraction={self.eval_fraction!r} is invalid: must be in [0, 1)")
        if self.split == "eval" and self.eval_fraction == 0.0:
            raise RecallError("eval_fraction=0.0 is invalid with split=eval: the eval part of the values is empty")
        _positive_int("mqar_pairs", self.mqar_pairs)
        _positive_int("mqar_queries", self.mqar_queries)
        if self.mqar_queries > self.mqar_pairs:
            raise RecallError(f"mqar_queries={self.mqar_queries} is invalid: at most mqar_pairs={self.mqar_pairs} "
                              "(each query asks a different key)")
        _positive_int("copy_length", self.copy_length)
        _positive_int("vt_hops", self.vt_hops)
        _positive_int("vt_chains", self.vt_chains)
        _positive_int("corpus_bytes", self.corpus_bytes)
        return self


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecallError(f"{name}={value!r} is invalid: must be a positive integer")


# ---- the value split -------------------------------------------------------------------------
def _unit_hash(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"megaseg-recall-{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def value_split(value: str, eval_fraction: float) -> str:
    """``"eval"`` or ``"train"``: the part of the value space ``value`` belongs to. Depends
    only on the value's text (leading/trailing spaces ignored) and ``eval_fraction``, so it
    is the same for every seed, tokenizer and run."""
    return "eval" if _unit_hash(value.strip(), "split") < eval_fraction else "train"


# ---- tokens ------------------------------------------------------------------------------------
class _Encoder:
    """``encode(text, add_bos)`` (what `Haystack` calls) over a data-side tokenizer."""

    bos_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.tokenizer.tokenize(text))


@dataclass
class _Piece:
    """Token ids of one planted text (needle, question or answer) and its fields' spans
    (name, start, end, text) relative to the piece."""

    role: str
    text: str
    ids: list[int]
    fields: list[tuple[str, int, int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


_FIELD = re.compile(r"( ?\{\w+\})")


def _template_piece(enc: Callable[[str], list[int]], role: str, template: str, **values: str) -> _Piece:
    """Encode ``template`` in parts: each ``{field}`` (with the space before it) is its own
    part, so the field's token span is exact."""
    ids: list[int] = []
    fields = []
    for part in _FIELD.split(template):
        if not part:
            continue
        m = re.fullmatch(r"( ?)\{(\w+)\}", part)
        text = part if m is None else m.group(1) + values[m.group(2)]
        part_ids = enc(text)
        if m is not None:
            if not part_ids:
                raise RecallError(f"the tokenizer encodes {text!r} to no tokens; it cannot plant it")
            fields.append((m.group(2), len(ids), len(ids) + len(part_ids), text))
        ids += part_ids
    return _Piece(role, template.format(**values), ids, fields)


def _list_piece(enc, role: str, name: str, items: Sequence[str], sep: str, end: str) -> _Piece:
    """`` a<sep> b<sep> c<end>`` with each item (and its leading space) as a field."""
    ids: list[int] = []
    fields = []
    for i, item in enumerate(items):
        if i:
            ids += enc(sep)
        item_ids = enc(" " + item)
        fields.append((name, len(ids), len(ids) + len(item_ids), " " + item))
        ids += item_ids
    ids += enc(end)
    return _Piece(role, " " + f"{sep} ".join(items) + end, ids, fields)


def mqar_vocabulary(tokenizer) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(keys, values) for MQAR: ids whose text is a short word or a 2-3 digit number that
    the tokenizer encodes back to exactly that id. Numbers are values; words go to keys or
    values by a hash of their text. With many `` word`` forms (a leading space) only those
    are used. Sorted by id; deterministic in the tokenizer."""
    found = []
    for tid in range(tokenizer.vocab_size):
        try:
            text = tokenizer.detokenize([tid])
        except Exception:  # an id the tokenizer cannot decode alone
            continue
        if _MQAR_TOKEN.fullmatch(text) and list(tokenizer.tokenize(text)) == [tid]:
            found.append((tid, text))
    spaced = [(t, s) for t, s in found if s.startswith(" ")]
    if len(spaced) >= _MQAR_PREFER_SPACED:
        found = spaced
    keys, values = [], []
    for tid, text in found:
        word = text.strip()
        if word.isdigit() or _unit_hash(word, "mqar-side") < 0.5:
            values.append((tid, text))
        else:
            keys.append((tid, text))
    return keys, values


# ---- one document --------------------------------------------------------------------------------
@dataclass
class RecallDocument:
    ids: list[int]
    record: dict


def _digits(rng: random.Random, n: int = 5) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _letters(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


def _span(start: int, end: int, text: str) -> dict:
    return {"start": start, "end": end, "text": text}


def _pick(lo: int, hi: int, bounds: Sequence[int], rng: random.Random) -> int:
    """A haystack offset in [lo, hi]: a line boundary when one lies in the range."""
    inside = [b for b in bounds if lo <= b <= hi]
    return rng.choice(inside) if inside else rng.randint(lo, hi)


class RecallGenerator:
    """Documents of `RecallSettings` for one tokenizer (a data-side tokenizer from
    ``megaseg.data.tokenizer.load_tokenizer``: ``tokenize``, ``detokenize``, ``eod``,
    ``bos``, ``vocab_size``)."""

    def __init__(self, tokenizer, settings: RecallSettings, haystack: Haystack | None = None, name: str = "tokenizer"):
        self.settings = settings.validate()
        self.tokenizer = tokenizer
        self.name = name
        self.eod = tokenizer.eod
        self.bos = None
        if settings.append_bos:
            try:
                self.bos = tokenizer.bos
            except AttributeError as exc:
                raise RecallError(f"append_bos=True is invalid: {exc}") from None
        self.haystack = haystack or Haystack.from_source(_Encoder(tokenizer), settings.corpus, settings.corpus_bytes)
        self._enc_cache: dict[str, list[int]] = {}
        self._mqar = None
        if {"mqar", "copy"} & set(settings.tasks) and settings.haystack_fraction < 1.0:
            self._mqar = self._mqar_pools()

    def enc(self, text: str) -> list[int]:
        ids = self._enc_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.tokenize(text))
            if len(self._enc_cache) < 100_000:
                self._enc_cache[text] = ids
        return list(ids)

    # -- values ----------------------------------------------------------------------------
    def _mqar_pools(self):
        s = self.settings
        keys, values = mqar_vocabulary(self.tokenizer)
        if not values or not keys:
            raise RecallError(f"{self.name} has no single-token values for MQAR: no short word or 2-3 digit number "
                              "encodes to one token")
        if len(keys) < s.mqar_pairs:
            raise RecallError(f"mqar_pairs={s.mqar_pairs} is invalid for {self.name}: it has only {len(keys)} "
                              "single-token keys for MQAR")
        pool = [(t, v) for t, v in values if value_split(v, s.eval_fraction) == s.split]
        if not pool:
            raise RecallError(f"eval_fraction={s.eval_fraction} leaves no {s.split} values for MQAR among the "
                              f"{len(values)} single-token values of {self.name}")
        return keys, pool

    def _value(self, rng: random.Random, taken: Sequence[str] = ()) -> str:
        """A 5-digit value of this split."""
        while True:
            v = _digits(rng)
            if v not in taken and value_split(v, self.settings.eval_fraction) == self.settings.split:
                return v

    # -- tasks: (targets, distractor chains, question, answer, answer field names, values) --
    def _passkey(self, rng):
        v = self._value(rng)
        needle = _template_piece(self.enc, "target", PASSKEY_NEEDLE, value=v)
        question = _template_piece(self.enc, "question", PASSKEY_QUERY)
        answer = _list_piece(self.enc, "answer", "value", [v], ",", ".")
        return [needle], [], question, answer, [v]

    def _niah(self, rng, n_keys: int, n_values: int):
        keys = self.haystack.sample_words(n_keys, rng)
        target, taken = keys[0], []
        values = {}
        for k in keys:
            values[k] = []
            for _ in range(n_values if k == target else 1):
                taken.append(self._value(rng, taken))
                values[k].append(taken[-1])
        targets = [_template_piece(self.enc, "target", NIAH_NEEDLE, key=target, value=v) for v in values[target]]
        distractors = [[_template_piece(self.enc, "distractor", NIAH_NEEDLE, key=k, value=values[k][0])]
                       for k in keys[1:]]
        template = NIAH_QUERY if n_values == 1 else NIAH_MULTI_QUERY
        question = _template_piece(self.enc, "question", template, key=target)
        answer = _list_piece(self.enc, "answer", "value", values[target], ",", ".")
        return targets, distractors, question, answer, taken

    def _variable_tracking(self, rng):
        s = self.settings
        names: set[str] = set()
        while len(names) < s.vt_hops * s.vt_chains:
            names.add(_letters(rng))
        order = sorted(names)
        rng.shuffle(order)
        values: list[str] = []
        while len(values) < s.vt_chains:
            values.append(self._value(rng, values))
        chains = []
        for c in range(s.vt_chains):
            chain = order[c * s.vt_hops:(c + 1) * s.vt_hops]
            role = "target" if c == 0 else "distractor"
            chains.append([
                _template_piece(self.enc, role, VT_FIRST, name=n, value=values[c]) if i == 0
                else _template_piece(self.enc, role, VT_HOP, name=n, prev=chain[i - 1])
                for i, n in enumerate(chain)
            ])
        question = _template_piece(self.enc, "question", VT_QUERY, value=values[0])
        answer = _list_piece(self.enc, "answer", "name", order[:s.vt_hops], "", ".")
        return chains[0], chains[1:], question, answer, values

    def _mqar_task(self, rng):
        s = self.settings
        key_pool, value_pool = self._mqar
        keys = rng.sample(key_pool, s.mqar_pairs)
        if len(value_pool) >= s.mqar_pairs:
            values = rng.sample(value_pool, s.mqar_pairs)
        else:
            values = [rng.choice(value_pool) for _ in range(s.mqar_pairs)]
        pairs = _Piece("target", "", [])
        for (kt, ks), (vt, vs) in zip(keys, values):
            n = len(pairs.ids)
            pairs.fields += [("key", n, n + 1, ks), ("value", n + 1, n + 2, vs)]
            pairs.ids += [kt, vt]
            pairs.text += ks + vs
        asked = rng.sample(range(s.mqar_pairs), s.mqar_queries)
        queries = _Piece("question", "", [])
        for i in asked:
            (kt, ks), (vt, vs) = keys[i], values[i]
            n = len(queries.ids)
            queries.fields += [("key", n, n + 1, ks), ("value", n + 1, n + 2, vs)]
            queries.ids += [kt, vt]
            queries.text += ks + vs
        return [pairs], [], queries, None, sorted({v for _, v in values})

    def _copy_task(self, rng):
        """A span of random single-token words, repeated at the end: after its first token
        every token of the repeat is predictable by copying (an induction head's task), so
        it teaches a small model to copy from far back. The span's tokens are of this split,
        as values are; the repeat is the question block, its tokens after the first are the
        answers."""
        s = self.settings
        key_pool, value_pool = self._mqar
        pool = list(value_pool) + [(t, k) for t, k in key_pool if value_split(k, s.eval_fraction) == s.split]
        span = [rng.choice(pool) for _ in range(s.copy_length)]
        target, repeat = _Piece("target", "", []), _Piece("question", "", [])
        for i, (tid, text) in enumerate(span):
            target.fields.append(("value", i, i + 1, text))
            repeat.fields.append(("key" if i == 0 else "value", i, i + 1, text))
            for piece in (target, repeat):
                piece.ids.append(tid)
                piece.text += text
        return [target], [], repeat, None, sorted({text for _, text in span})

    # -- layout ------------------------------------------------------------------------------
    def document(self, index: int) -> RecallDocument:
        """Document ``index`` (deterministic in the settings, the split and the index)."""
        s = self.settings
        rng = random.Random(f"megaseg-recall:{s.seed}:{s.split}:{index}")
        length = rng.choice(s.lengths)
        if rng.random() < s.haystack_fraction:
            return self._plain(index, length, rng)
        return self.make(index, rng.choice(s.tasks), length, rng)

    def make(self, index: int, task: str, length: int, rng: random.Random) -> RecallDocument:
        """One document of ``task`` (or ``"haystack"``) with ``length`` tokens."""
        if task == HAYSTACK:
            return self._plain(index, length, rng)
        if task == "passkey":
            made = self._passkey(rng)
        elif task == "niah_single":
            made = self._niah(rng, 1, 1)
        elif task == "niah_multikey":
            made = self._niah(rng, 4, 1)
        elif task == "niah_multivalue":
            made = self._niah(rng, 1, 4)
        elif task == "variable_tracking":
            made = self._variable_tracking(rng)
        elif task == "mqar":
            made = self._mqar_task(rng)
        elif task == "copy":
            made = self._copy_task(rng)
        else:
            raise RecallError(f"task={task!r} is invalid: recall tasks are {', '.join(RECALL_TASKS)}")
        return self._layout(index, task, length, rng, *made)

    def _head(self) -> list[int]:
        return [self.bos] if self.bos is not None else []

    def _plain(self, index: int, length: int, rng: random.Random) -> RecallDocument:
        head = self._head()
        body = [t for chunk in self.haystack.chunks(length - len(head) - 1, rng) for t in chunk]
        ids = head + body + [self.eod]
        record = {"doc": index, "split": self.settings.split, "task": HAYSTACK, "length": length,
                  "segment_length": self.settings.segment_length, "gap_segments": None, "distance": None,
                  "needles": [], "question": None, "answer": None, "answers": [], "references": [], "values": []}
        return RecallDocument(ids, record)

    def _layout(self, index, task, length, rng, targets, distractors, question, answer, values) -> RecallDocument:
        s = self.settings
        S = s.segment_length
        head = self._head()
        b = len(head)
        anchor, pre_target = targets[-1], targets[:-1]
        tail = len(question) + (len(answer) if answer is not None else 0)
        needles_len = sum(map(len, targets)) + sum(len(p) for chain in distractors for p in chain)
        fixed = b + needles_len + tail + 1
        if fixed > length:
            raise RecallError(f"length={length} is too short for task {task!r}: its needles, question and answer "
                              f"need {fixed} tokens with eod{' and bos' if b else ''}")
        H = length - fixed
        qs = length - 1 - tail  # the question starts here
        qseg = qs // S
        A = len(anchor)
        pre_len = sum(map(len, pre_target))

        def plan(before_counts):
            Pb = pre_len + sum(len(p) for chain, k in zip(distractors, before_counts) for p in chain[:k])
            Pa = needles_len - A - Pb
            e_lo, e_hi = b + Pb + A - 1, qs - 1 - Pa
            gaps = []
            for g in range(s.min_gap_segments, s.max_gap_segments + 1):
                seg = qseg - g
                if seg >= 0 and max(seg * S, e_lo) <= min((seg + 1) * S - 1, e_hi):
                    gaps.append(g)
            return Pb, e_lo, e_hi, gaps

        choices = [[rng.randint(0, len(chain)) for chain in distractors],
                   [len(chain) for chain in distractors], [0] * len(distractors)]
        for before_counts in choices:
            Pb, e_lo, e_hi, gaps = plan(before_counts)
            if gaps:
                break
        else:
            _, e_lo, _, _ = plan([0] * len(distractors))
            _, _, e_hi, _ = plan([len(c) for c in distractors])
            raise RecallError(
                f"gap_segments={s.min_gap_segments}..{s.max_gap_segments} does not fit task {task!r} at "
                f"length={length}, segment_length={S}: the question starts in segment {qseg} and the needle can "
                f"end in segments {e_lo // S}..{max(e_hi, 0) // S} (gaps {qseg - max(e_hi, 0) // S}.."
                f"{qseg - e_lo // S})")
        gap = rng.choice(gaps)
        seg = qseg - gap
        lo, hi = max(seg * S, e_lo), min((seg + 1) * S - 1, e_hi)

        chunks = self.haystack.chunks(H, rng)
        hay = [t for c in chunks for t in c]
        bounds = [0]
        for c in chunks:
            bounds.append(bounds[-1] + len(c))
        # The anchor's end e = b + hb + Pb + A - 1, where hb is the haystack before it.
        hb = _pick(lo - (b + Pb + A - 1), hi - (b + Pb + A - 1), bounds, rng)

        # Needles before the anchor: the other targets and a prefix of each distractor
        # chain, interleaved at random keeping every chain's order; the rest after it.
        chains_before = [list(pre_target)] + [chain[:n] for chain, n in zip(distractors, before_counts)]
        chains_after = [chain[n:] for chain, n in zip(distractors, before_counts)]
        before, after = _interleave(chains_before, rng), _interleave(chains_after, rng)
        events = [(o, i, p) for i, (o, p) in enumerate(zip(sorted(_pick(0, hb, bounds, rng) for _ in before), before))]
        events.append((hb, len(before), anchor))
        offsets = sorted(_pick(hb, H, bounds, rng) for _ in after)
        events += [(o, len(before) + 1 + i, p) for i, (o, p) in enumerate(zip(offsets, after))]
        events.sort(key=lambda ev: (ev[0], ev[1]))

        ids = list(head)
        at = 0
        placed = []  # (start, piece)
        for offset, _, piece in events:
            ids += hay[at:offset]
            at = offset
            placed.append((len(ids), piece))
            ids += piece.ids
        ids += hay[at:]
        assert len(ids) == qs
        q_start = len(ids)
        ids += question.ids
        a_start = len(ids)
        if answer is not None:
            ids += answer.ids
        ids.append(self.eod)
        assert len(ids) == length, (len(ids), length)

        anchor_start = next(st for st, p in placed if p is anchor)
        e = anchor_start + A - 1
        assert lo <= e <= hi and qseg - e // S == gap

        def fields(start, piece):
            return [{"name": n, "start": start + a, "end": start + z, "text": t} for n, a, z, t in piece.fields]

        needles = [{"role": p.role, "start": st, "end": st + len(p), "text": p.text, "segment": (st + len(p) - 1) // S,
                    "gap_segments": qseg - (st + len(p) - 1) // S, "fields": fields(st, p)} for st, p in placed]
        q_rec = {**_span(q_start, a_start, question.text), "segment": qseg, "fields": fields(q_start, question)}
        if answer is not None:
            a_rec = _span(a_start, a_start + len(answer), answer.text)
            answers = [_span(f["start"], f["end"], f["text"]) for f in fields(a_start, answer)]
        else:  # MQAR: each query's value follows its key inside the question block
            a_rec = None
            answers = [_span(f["start"], f["end"], f["text"])
                       for f in fields(q_start, question) if f["name"] == "value"]
        record = {
            "doc": index, "split": s.split, "task": task, "length": length, "segment_length": S,
            "gap_segments": gap, "distance": q_start - e,
            "needles": needles, "question": q_rec, "answer": a_rec, "answers": answers,
            "references": [a["text"].strip() for a in answers],
            "values": sorted(set(v.strip() for v in values)),
        }
        return RecallDocument(ids, record)


def _interleave(chains: list[list[_Piece]], rng: random.Random) -> list[_Piece]:
    chains = [list(c) for c in chains if c]
    out = []
    while chains:
        weights = [len(c) for c in chains]
        i = rng.choices(range(len(chains)), weights)[0]
        out.append(chains[i].pop(0))
        chains = [c for c in chains if c]
    return out


# ---- writing -----------------------------------------------------------------------------------
@dataclass
class RecallResult:
    """What `write_recall_dataset` wrote."""

    data_prefix: str
    needles_path: str
    documents: int = 0
    tokens: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        counts = ", ".join(f"{task}={n}" for task, n in self.tasks.items())
        return (f"{self.documents} documents, {self.tokens} tokens ({counts}) -> {self.data_prefix}.bin/.idx, "
                f"{self.needles_path}")


def needles_path_for(output_prefix: str | Path) -> str:
    return f"{output_prefix}_needles.jsonl"


def data_prefix_for(output_prefix: str | Path) -> str:
    return f"{output_prefix}_text_document"


def write_recall_dataset(
    tokenizer_model: str | Path,
    output_prefix: str | Path,
    settings: RecallSettings,
    tokenizer_type: str | None = None,
    log: Callable[[str], None] | None = None,
    log_interval: int = 1000,
) -> RecallResult:
    """Generate ``settings.documents`` documents with ``tokenizer_model`` (a sentencepiece
    ``.model`` or a Hugging Face tokenizer directory) and write
    ``<prefix>_text_document.bin/.idx`` and ``<prefix>_needles.jsonl``.

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
    result = RecallResult(data_prefix_for(output_prefix), needles_path_for(output_prefix))
    tmp = f".tmp{os.getpid()}"
    bin_tmp, idx_tmp, jsonl_tmp = (f"{result.data_prefix}{tmp}.bin", f"{result.data_prefix}{tmp}.idx",
                                   f"{result.needles_path}{tmp}")
    builder = IndexedDatasetBuilder(bin_tmp, dtype=DType.optimal_dtype(tokenizer.vocab_size))
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    try:
        with open(jsonl_tmp, "w", encoding="utf-8") as sidecar:
            for i in range(settings.documents):
                doc = generator.document(i)
                builder.add_document(doc.ids, [len(doc.ids)])
                sidecar.write(json.dumps(doc.record, ensure_ascii=False) + "\n")
                counts[doc.record["task"]] += 1
                result.tokens += len(doc.ids)
                result.documents += 1
                if log is not None and (i + 1) % log_interval == 0 and i + 1 < settings.documents:
                    rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
                    log(f"{i + 1}/{settings.documents} documents, {rate:.0f} docs/s")
        builder.finalize(idx_tmp)
        os.replace(bin_tmp, f"{result.data_prefix}.bin")
        os.replace(idx_tmp, f"{result.data_prefix}.idx")
        os.replace(jsonl_tmp, result.needles_path)
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for path in (bin_tmp, idx_tmp, jsonl_tmp):
            Path(path).unlink(missing_ok=True)
    result.tasks = {task: counts[task] for task in (*settings.tasks, HAYSTACK) if counts[task]}
    result.seconds = time.perf_counter() - start
    return result


def _probe(generator: RecallGenerator) -> None:
    """Generate one document of every (task, length) so that impossible settings fail before
    any output is opened."""
    s = generator.settings
    tasks = (s.tasks if s.haystack_fraction < 1.0 else ()) + ((HAYSTACK,) if s.haystack_fraction > 0.0 else ())
    for task in tasks:
        for length in s.lengths:
            generator.make(-1, task, length, random.Random(f"megaseg-recall-probe:{s.seed}:{task}:{length}"))
