"""What recall training data is requested (`RecallSettings`, checked by ``validate``) and
the split of the value space into a train and an eval part (`value_split`).

Values (pass keys, magic numbers, variable values, MQAR value tokens) are split once, by
a hash of the value's text, into a train and an eval part (``eval_fraction``): train
documents only ever plant train values, ``split="eval"`` documents only eval values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from megaseg.config import ConfigError

RECALL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "mqar", "copy")
HAYSTACK = "haystack"  # the task name of a plain-text document (no recall structure)
SPLITS = ("train", "eval")


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
    value_digits: int = 5  # digits of a pass key, magic number or variable value; 0: one single-token word
    align_answer: bool = False  # the question's last token (which predicts the answer) starts a segment

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
        if not isinstance(self.value_digits, int) or isinstance(self.value_digits, bool) \
                or not 0 <= self.value_digits <= 9:
            raise RecallError(f"value_digits={self.value_digits!r} is invalid: 1 to 9 digits, or 0 for a "
                              "single-token value")
        no_answer = [t for t in self.tasks if t in ("mqar", "copy")]
        if self.align_answer and no_answer:
            raise RecallError(f"align_answer=True is invalid with tasks {no_answer}: their answers are spread "
                              "over a block of queries; align tasks with one question and answer")
        return self


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecallError(f"{name}={value!r} is invalid: must be a positive integer")


# ---- the value split -------------------------------------------------------------------------
def unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``text`` and ``salt`` alone (sha256)."""
    digest = hashlib.sha256(f"megaseg-recall-{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def value_split(value: str, eval_fraction: float) -> str:
    """``"eval"`` or ``"train"``: the part of the value space ``value`` belongs to. Depends
    only on the value's text (leading/trailing spaces ignored) and ``eval_fraction``, so it
    is the same for every seed, tokenizer and run."""
    return "eval" if unit_hash(value.strip(), "split") < eval_fraction else "train"
