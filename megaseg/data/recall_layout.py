"""One recall document laid out: haystack text with a task's needles, its question and its
answer placed at exact token offsets, and the sidecar record of those offsets.

Placement is controlled in segments: the last token of the anchor (the last target
needle) lies ``gap`` segment boundaries before the first token of the question, with
``gap`` drawn uniformly from the feasible values in ``[min_gap_segments,
max_gap_segments]``. The other needles go before or after the anchor (each distractor
chain keeps its order), at haystack line boundaries where one lies in range. The question
and its answer end the document, followed by eod; with ``align_answer`` the token that
predicts the answer's first token (the question's last) starts a segment, so the retrieved
prefix it reads was selected by the query of the question's second-to-last token, the last
of the segment before (docs/semantics.md §4); haystack text fills the rest of the document
after the answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from megaseg.data.haystack import Haystack
from megaseg.data.recall_pieces import Piece, Planted
from megaseg.data.recall_settings import HAYSTACK, RecallError, RecallSettings


@dataclass
class RecallDocument:
    ids: list[int]
    record: dict


@dataclass
class _Frame:
    """The token arithmetic of one document of ``length`` tokens and segments of ``S``."""

    length: int
    S: int
    b: int  # head tokens (bos)
    H: int  # haystack tokens
    qs: int  # the question starts here
    qseg: int  # ... in this segment
    needles_len: int  # tokens of all needles
    pre_len: int  # tokens of the targets before the anchor
    A: int  # tokens of the anchor
    trail: int = 0  # haystack tokens after the answer (align_answer)


def _span(start: int, end: int, text: str) -> dict:
    return {"start": start, "end": end, "text": text}


def _pick(lo: int, hi: int, bounds: Sequence[int], rng: random.Random) -> int:
    """A haystack offset in [lo, hi]: a line boundary when one lies in the range."""
    inside = [b for b in bounds if lo <= b <= hi]
    return rng.choice(inside) if inside else rng.randint(lo, hi)


def _interleave(chains: list[list[Piece]], rng: random.Random) -> list[Piece]:
    chains = [list(c) for c in chains if c]
    out = []
    while chains:
        weights = [len(c) for c in chains]
        i = rng.choices(range(len(chains)), weights)[0]
        out.append(chains[i].pop(0))
        chains = [c for c in chains if c]
    return out


def _fields(start: int, piece: Piece) -> list[dict]:
    return [{"name": n, "start": start + a, "end": start + z, "text": t} for n, a, z, t in piece.fields]


class DocumentLayout:
    """Lays out documents of `RecallSettings`: ``head`` (bos or nothing) first, text of
    ``haystack``, ``eod`` last."""

    def __init__(self, settings: RecallSettings, haystack: Haystack, head: list[int], eod: int):
        self.settings = settings
        self.haystack = haystack
        self.head = head
        self.eod = eod

    def plain(self, index: int, length: int, rng: random.Random) -> RecallDocument:
        """A document of haystack text only (task ``"haystack"``)."""
        head = list(self.head)
        body = [t for chunk in self.haystack.chunks(length - len(head) - 1, rng) for t in chunk]
        ids = head + body + [self.eod]
        record = {"doc": index, "split": self.settings.split, "task": HAYSTACK, "length": length,
                  "segment_length": self.settings.segment_length, "gap_segments": None, "distance": None,
                  "needles": [], "question": None, "answer": None, "answers": [], "references": [], "values": []}
        return RecallDocument(ids, record)

    def place(self, index: int, task: str, length: int, rng: random.Random, planted: Planted) -> RecallDocument:
        """Document ``index`` of ``task``: ``planted`` in haystack text, ``length`` tokens."""
        f = self._frame(task, length, planted)
        S = f.S
        before_counts, Pb, e_lo, e_hi, gaps = self._split_chains(f, task, planted, rng)
        gap = rng.choice(gaps)
        seg = f.qseg - gap
        lo, hi = max(seg * S, e_lo), min((seg + 1) * S - 1, e_hi)

        chunks = self.haystack.chunks(f.H, rng)
        hay = [t for c in chunks for t in c]
        bounds = [0]
        for c in chunks:
            bounds.append(bounds[-1] + len(c))
        # The anchor's end e = b + hb + Pb + A - 1, where hb is the haystack before it.
        hb = _pick(lo - (f.b + Pb + f.A - 1), hi - (f.b + Pb + f.A - 1), bounds, rng)
        events = _needle_events(planted, before_counts, hb, f.H, bounds, rng)

        after = [t for c in self.haystack.chunks(f.trail, rng) for t in c] if f.trail else []
        ids, placed = self._assemble(hay, events, f, planted, after)
        anchor_start = next(st for st, p in placed if p is planted.targets[-1])
        e = anchor_start + f.A - 1
        assert lo <= e <= hi and f.qseg - e // S == gap
        return RecallDocument(ids, self._record(index, task, f, gap, e, placed, planted))

    # -- the steps of `place` -------------------------------------------------------------
    def _frame(self, task: str, length: int, planted: Planted) -> _Frame:
        """The document's token budget; RecallError when the needles, question and answer
        do not fit in ``length``."""
        b = len(self.head)
        question, answer = planted.question, planted.answer
        tail = len(question) + (len(answer) if answer is not None else 0)
        needles_len = sum(map(len, planted.targets)) + sum(len(p) for chain in planted.distractors for p in chain)
        fixed = b + needles_len + tail + 1
        if fixed > length:
            raise RecallError(f"length={length} is too short for task {task!r}: its needles, question and answer "
                              f"need {fixed} tokens with eod{' and bos' if b else ''}")
        S = self.settings.segment_length
        qs, trail = length - 1 - tail, 0
        if self.settings.align_answer:
            a_start = (length - 2 - (tail - len(question))) // S * S + 1
            qs, trail = a_start - len(question), length - 1 - tail - (a_start - len(question))
            if qs < b + needles_len:
                raise RecallError(f"length={length} is too short for task {task!r} with align_answer: the answer "
                                  f"would start at token {a_start}, before its needles fit")
        return _Frame(length=length, S=S, b=b, H=length - fixed - trail, qs=qs, qseg=qs // S,
                      needles_len=needles_len, pre_len=sum(map(len, planted.targets[:-1])),
                      A=len(planted.targets[-1]), trail=trail)

    def _window(self, f: _Frame, planted: Planted, before_counts: Sequence[int]):
        """(Pb, e_lo, e_hi, gaps) with the first ``before_counts`` needles of each distractor
        chain before the anchor: Pb needle tokens precede the anchor, whose last token can lie
        in [e_lo, e_hi], and the feasible gaps."""
        s, S = self.settings, f.S
        Pb = f.pre_len + sum(len(p) for chain, k in zip(planted.distractors, before_counts) for p in chain[:k])
        Pa = f.needles_len - f.A - Pb
        e_lo, e_hi = f.b + Pb + f.A - 1, f.qs - 1 - Pa
        gaps = []
        for g in range(s.min_gap_segments, s.max_gap_segments + 1):
            seg = f.qseg - g
            if seg >= 0 and max(seg * S, e_lo) <= min((seg + 1) * S - 1, e_hi):
                gaps.append(g)
        return Pb, e_lo, e_hi, gaps

    def _split_chains(self, f: _Frame, task: str, planted: Planted, rng: random.Random):
        """(before_counts, Pb, e_lo, e_hi, gaps): how many needles of each distractor chain go
        before the anchor (a random number, else all, else none: the first with a feasible
        gap) and `_window` of it; RecallError when no gap fits."""
        s, S, distractors = self.settings, f.S, planted.distractors
        choices = [[rng.randint(0, len(chain)) for chain in distractors],
                   [len(chain) for chain in distractors], [0] * len(distractors)]
        for before_counts in choices:
            Pb, e_lo, e_hi, gaps = self._window(f, planted, before_counts)
            if gaps:
                return before_counts, Pb, e_lo, e_hi, gaps
        _, e_lo, _, _ = self._window(f, planted, [0] * len(distractors))
        _, _, e_hi, _ = self._window(f, planted, [len(c) for c in distractors])
        raise RecallError(
            f"gap_segments={s.min_gap_segments}..{s.max_gap_segments} does not fit task {task!r} at "
            f"length={f.length}, segment_length={S}: the question starts in segment {f.qseg} and the needle can "
            f"end in segments {e_lo // S}..{max(e_hi, 0) // S} (gaps {f.qseg - max(e_hi, 0) // S}.."
            f"{f.qseg - e_lo // S})")

    def _assemble(self, hay: list[int], events, f: _Frame, planted: Planted, after: list[int]):
        """(ids, [(start, piece)] of the needles): head, haystack with the needles at their
        offsets, question, answer, ``after`` (haystack), eod."""
        ids = list(self.head)
        at = 0
        placed = []  # (start, piece)
        for offset, _, piece in events:
            ids += hay[at:offset]
            at = offset
            placed.append((len(ids), piece))
            ids += piece.ids
        ids += hay[at:]
        assert len(ids) == f.qs
        ids += planted.question.ids
        if planted.answer is not None:
            ids += planted.answer.ids
        ids += after
        ids.append(self.eod)
        assert len(ids) == f.length, (len(ids), f.length)
        return ids, placed

    def _record(self, index: int, task: str, f: _Frame, gap: int, e: int, placed, planted: Planted) -> dict:
        """The sidecar record: every needle, the question and the answers, with exact offsets."""
        S, qseg = f.S, f.qseg
        question, answer = planted.question, planted.answer
        q_start = f.qs
        a_start = q_start + len(question)
        needles = [{"role": p.role, "start": st, "end": st + len(p), "text": p.text, "segment": (st + len(p) - 1) // S,
                    "gap_segments": qseg - (st + len(p) - 1) // S, "fields": _fields(st, p)} for st, p in placed]
        q_rec = {**_span(q_start, a_start, question.text), "segment": qseg, "fields": _fields(q_start, question)}
        if answer is not None:
            a_rec = _span(a_start, a_start + len(answer), answer.text)
            answers = [_span(fd["start"], fd["end"], fd["text"]) for fd in _fields(a_start, answer)]
        else:  # MQAR: each query's value follows its key inside the question block
            a_rec = None
            answers = [_span(fd["start"], fd["end"], fd["text"])
                       for fd in _fields(q_start, question) if fd["name"] == "value"]
        return {
            "doc": index, "split": self.settings.split, "task": task, "length": f.length, "segment_length": S,
            "gap_segments": gap, "distance": q_start - e,
            "needles": needles, "question": q_rec, "answer": a_rec, "answers": answers,
            "references": [a["text"].strip() for a in answers],
            "values": sorted(set(v.strip() for v in planted.values)),
        }


def _needle_events(planted: Planted, before_counts: Sequence[int], hb: int, H: int, bounds: Sequence[int],
                   rng: random.Random) -> list[tuple[int, int, Piece]]:
    """(haystack offset, order, piece) of every needle, sorted: the anchor at ``hb``; before
    it the other targets and a prefix of each distractor chain, interleaved at random
    keeping every chain's order; the rest after it."""
    anchor, pre_target = planted.targets[-1], planted.targets[:-1]
    chains_before = [list(pre_target)] + [chain[:n] for chain, n in zip(planted.distractors, before_counts)]
    chains_after = [chain[n:] for chain, n in zip(planted.distractors, before_counts)]
    before, after = _interleave(chains_before, rng), _interleave(chains_after, rng)
    events = [(o, i, p) for i, (o, p) in enumerate(zip(sorted(_pick(0, hb, bounds, rng) for _ in before), before))]
    events.append((hb, len(before), anchor))
    offsets = sorted(_pick(hb, H, bounds, rng) for _ in after)
    events += [(o, len(before) + 1 + i, p) for i, (o, p) in enumerate(zip(offsets, after))]
    events.sort(key=lambda ev: (ev[0], ev[1]))
    return events
