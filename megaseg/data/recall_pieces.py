"""The token pieces recall documents are built from: each needle, question and answer is
encoded in parts (a field such as a value with its leading space is one part), so every
field's token span inside its piece is exact; and the single-token MQAR vocabulary of a
tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from megaseg.data.recall_settings import RecallError, unit_hash

# MQAR candidates: a word of 2-12 letters or a 2-3 digit number, optionally with a leading
# space, that the tokenizer encodes as exactly that one id.
_MQAR_TOKEN = re.compile(r" ?(?:[A-Za-z]{2,12}|[0-9]{2,3})")
_MQAR_PREFER_SPACED = 64  # use only " word" forms when the tokenizer has at least this many


@dataclass
class Piece:
    """Token ids of one planted text (needle, question or answer) and its fields' spans
    (name, start, end, text) relative to the piece."""

    role: str
    text: str
    ids: list[int]
    fields: list[tuple[str, int, int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Planted:
    """What one task plants in a document: the target needles (the last one is the anchor
    whose distance to the question is controlled), chains of distractor needles (each
    chain keeps its order), the question, the answer (None for MQAR and copy, whose
    answers are fields of the question block) and the values used."""

    targets: list[Piece]
    distractors: list[list[Piece]]
    question: Piece
    answer: Piece | None
    values: list[str]


_FIELD = re.compile(r"( ?\{\w+\})")


def template_piece(enc: Callable[[str], list[int]], role: str, template: str, **values: str) -> Piece:
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
    return Piece(role, template.format(**values), ids, fields)


def list_piece(enc, role: str, name: str, items: Sequence[str], sep: str, end: str) -> Piece:
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
    return Piece(role, " " + f"{sep} ".join(items) + end, ids, fields)


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
        if word.isdigit() or unit_hash(word, "mqar-side") < 0.5:
            values.append((tid, text))
        else:
            keys.append((tid, text))
    return keys, values
