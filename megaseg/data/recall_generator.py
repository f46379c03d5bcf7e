"""`RecallGenerator`: the documents of `RecallSettings` for one tokenizer. Draws the
values of the split asked for and builds each task's needles, question and answer
(``passkey``, ``niah_*``, ``variable_tracking`` from the templates of
``megaseg.data.haystack``; ``mqar`` and ``copy`` from single-token words), which
``megaseg.data.recall_layout`` places in haystack text.

Document ``i`` is deterministic in (settings, seed, split, ``i``, tokenizer, corpus).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from megaseg.data.haystack import (
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
from megaseg.data.recall_layout import DocumentLayout, RecallDocument
from megaseg.data.recall_pieces import Piece, Planted, list_piece, mqar_vocabulary, template_piece
from megaseg.data.recall_settings import HAYSTACK, RECALL_TASKS, RecallError, RecallSettings, value_split


class _Encoder:
    """``encode(text, add_bos)`` (what `Haystack` calls) over a data-side tokenizer."""

    bos_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.tokenizer.tokenize(text))


def _digits(rng: random.Random, n: int = 5) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _letters(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


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
        self.layout = DocumentLayout(settings, self.haystack, [self.bos] if self.bos is not None else [], self.eod)
        self._enc_cache: dict[str, list[int]] = {}
        self._mqar = None
        if ({"mqar", "copy"} & set(settings.tasks) or settings.value_digits == 0) and settings.haystack_fraction < 1.0:
            self._mqar = self._mqar_pools()
        self._token_values = []
        if settings.value_digits == 0 and self._mqar is not None:
            # planted as " value" (template field or answer item): one token in that form
            self._token_values = [t.strip() for _, t in self._mqar[1] if len(self.enc(" " + t.strip())) == 1]
            if not self._token_values:
                raise RecallError(f"value_digits=0 is invalid for {name}: none of its single-token values is one "
                                  "token after a space")

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
        """A value of this split: ``value_digits`` digits, or with 0 one single-token word of
        the MQAR value pool (each answer is then one token to copy)."""
        if self.settings.value_digits == 0:
            return rng.choice([v for v in self._token_values if v not in taken])
        while True:
            v = _digits(rng, self.settings.value_digits)
            if v not in taken and value_split(v, self.settings.eval_fraction) == self.settings.split:
                return v

    # -- tasks: what each plants ----------------------------------------------------------
    def _passkey(self, rng) -> Planted:
        v = self._value(rng)
        needle = template_piece(self.enc, "target", PASSKEY_NEEDLE, value=v)
        question = template_piece(self.enc, "question", PASSKEY_QUERY)
        answer = list_piece(self.enc, "answer", "value", [v], ",", ".")
        return Planted([needle], [], question, answer, [v])

    def _niah(self, rng, n_keys: int, n_values: int) -> Planted:
        keys = self.haystack.sample_words(n_keys, rng)
        target, taken = keys[0], []
        values = {}
        for k in keys:
            values[k] = []
            for _ in range(n_values if k == target else 1):
                taken.append(self._value(rng, taken))
                values[k].append(taken[-1])
        targets = [template_piece(self.enc, "target", NIAH_NEEDLE, key=target, value=v) for v in values[target]]
        distractors = [[template_piece(self.enc, "distractor", NIAH_NEEDLE, key=k, value=values[k][0])]
                       for k in keys[1:]]
        template = NIAH_QUERY if n_values == 1 else NIAH_MULTI_QUERY
        question = template_piece(self.enc, "question", template, key=target)
        answer = list_piece(self.enc, "answer", "value", values[target], ",", ".")
        return Planted(targets, distractors, question, answer, taken)

    def _variable_tracking(self, rng) -> Planted:
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
                template_piece(self.enc, role, VT_FIRST, name=n, value=values[c]) if i == 0
                else template_piece(self.enc, role, VT_HOP, name=n, prev=chain[i - 1])
                for i, n in enumerate(chain)
            ])
        question = template_piece(self.enc, "question", VT_QUERY, value=values[0])
        answer = list_piece(self.enc, "answer", "name", order[:s.vt_hops], "", ".")
        return Planted(chains[0], chains[1:], question, answer, values)

    def _mqar_task(self, rng) -> Planted:
        s = self.settings
        key_pool, value_pool = self._mqar
        keys = rng.sample(key_pool, s.mqar_pairs)
        if len(value_pool) >= s.mqar_pairs:
            values = rng.sample(value_pool, s.mqar_pairs)
        else:
            values = [rng.choice(value_pool) for _ in range(s.mqar_pairs)]
        pairs = Piece("target", "", [])
        for (kt, ks), (vt, vs) in zip(keys, values):
            n = len(pairs.ids)
            pairs.fields += [("key", n, n + 1, ks), ("value", n + 1, n + 2, vs)]
            pairs.ids += [kt, vt]
            pairs.text += ks + vs
        asked = rng.sample(range(s.mqar_pairs), s.mqar_queries)
        queries = Piece("question", "", [])
        for i in asked:
            (kt, ks), (vt, vs) = keys[i], values[i]
            n = len(queries.ids)
            queries.fields += [("key", n, n + 1, ks), ("value", n + 1, n + 2, vs)]
            queries.ids += [kt, vt]
            queries.text += ks + vs
        return Planted([pairs], [], queries, None, sorted({v for _, v in values}))

    def _copy_task(self, rng) -> Planted:
        """A span of random single-token words, repeated at the end: after its first token
        every token of the repeat is predictable by copying (an induction head's task), so
        it teaches a small model to copy from far back. The span's tokens are of this split,
        as values are; the repeat is the question block, its tokens after the first are the
        answers."""
        s = self.settings
        key_pool, value_pool = self._mqar
        pool = list(value_pool) + [(t, k) for t, k in key_pool if value_split(k, s.eval_fraction) == s.split]
        span = [rng.choice(pool) for _ in range(s.copy_length)]
        target, repeat = Piece("target", "", []), Piece("question", "", [])
        for i, (tid, text) in enumerate(span):
            target.fields.append(("value", i, i + 1, text))
            repeat.fields.append(("key" if i == 0 else "value", i, i + 1, text))
            for piece in (target, repeat):
                piece.ids.append(tid)
                piece.text += text
        return Planted([target], [], repeat, None, sorted({text for _, text in span}))

    # -- documents ---------------------------------------------------------------------------
    def document(self, index: int) -> RecallDocument:
        """Document ``index`` (deterministic in the settings, the split and the index)."""
        s = self.settings
        rng = random.Random(f"megaseg-recall:{s.seed}:{s.split}:{index}")
        length = rng.choice(s.lengths)
        if rng.random() < s.haystack_fraction:
            return self.layout.plain(index, length, rng)
        return self.make(index, rng.choice(s.tasks), length, rng)

    def make(self, index: int, task: str, length: int, rng: random.Random) -> RecallDocument:
        """One document of ``task`` (or ``"haystack"``) with ``length`` tokens."""
        if task == HAYSTACK:
            return self.layout.plain(index, length, rng)
        if task == "passkey":
            planted = self._passkey(rng)
        elif task == "niah_single":
            planted = self._niah(rng, 1, 1)
        elif task == "niah_multikey":
            planted = self._niah(rng, 4, 1)
        elif task == "niah_multivalue":
            planted = self._niah(rng, 1, 4)
        elif task == "variable_tracking":
            planted = self._variable_tracking(rng)
        elif task == "mqar":
            planted = self._mqar_task(rng)
        elif task == "copy":
            planted = self._copy_task(rng)
        else:
            raise RecallError(f"task={task!r} is invalid: recall tasks are {', '.join(RECALL_TASKS)}")
        return self.layout.place(index, task, length, rng, planted)
