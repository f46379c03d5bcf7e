"""The alignment experiment's training data, byte-level tokens of natural text (Python
standard library sources): recall task samples (passkey, magic-number needles with
distractor keys), copy pieces (a random string repeated at random places in natural
text) and the copy warm-up's repeated random strings. Every tenth stdlib document is
held out for evaluation; training seeds are disjoint from evaluation's.
"""
from __future__ import annotations

import random

import torch

from megaseg.data.corpus import stdlib_documents
from megaseg.eval.experiment_config import ExperimentConfig
from megaseg.eval.tasks import Haystack, generate

TRAIN_TASKS = ("passkey", "niah_single", "niah_multikey")


def corpora(cfg: ExperimentConfig, tokenizer) -> tuple[Haystack, Haystack]:
    """(train, held-out) haystacks: every tenth stdlib document is held out."""
    docs = list(stdlib_documents(max_bytes=cfg.corpus_bytes))
    train = [d.text for i, d in enumerate(docs) if i % 10]
    held = [d.text for i, d in enumerate(docs) if i % 10 == 0]
    return Haystack(train, tokenizer, "stdlib-train"), Haystack(held, tokenizer, "stdlib-heldout")


def copy_piece(length: int, seed: int, tokenizer, haystack: Haystack, span: int, repeats: int = 4) -> list[int]:
    """Natural text with a random alphanumeric string of ``span`` characters inserted
    ``repeats`` times at random places: every repeat is predictable only by looking back
    (an in-context copy case; it makes copy heads form within a few hundred steps)."""
    rng = random.Random(f"copy:{length}:{seed}")
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(span))
    code = tokenizer.encode(" " + text + " ", add_bos=False)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    body = [t for c in haystack.chunks(length - len(bos) - repeats * len(code), rng) for t in c]
    cuts = sorted(rng.randrange(0, len(body) + 1) for _ in range(repeats))
    out, prev = list(bos), 0
    for c in cuts:
        out += body[prev:c] + code
        prev = c
    return out + body[prev:]


def copy_warmup_batch(cfg: ExperimentConfig, step: int, tokenizer) -> torch.Tensor:
    """Rows made of one random alphanumeric string repeated to the row length (the copy
    warm-up data: a small model on the natural-text mixture alone formed no copy heads
    within 800 steps)."""
    return torch.tensor([copy_warmup_row(cfg.train_length, f"warmup:{cfg.seed}:{step}:{b}", tokenizer)
                         for b in range(cfg.batch_size)], dtype=torch.long)


def copy_warmup_row(length: int, seed: str, tokenizer) -> list[int]:
    rng = random.Random(seed)
    span = rng.randrange(16, 49)
    unit = tokenizer.encode(" " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(span)),
                            add_bos=False)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    return (bos + unit * (length // len(unit) + 1))[:length]


def training_batch(cfg: ExperimentConfig, step: int, tokenizer, haystack: Haystack) -> torch.Tensor:
    """[batch, train_length]: each row concatenates pieces of train_length / pieces tokens;
    of every four pieces two are recall task samples (needle, natural text, query, answer),
    one a copy piece, one a repeated random string as in the warm-up (without these the
    warm-up's copy ability was gone after 600 steps of the rest). Seeds are disjoint from
    evaluation's."""
    piece = cfg.train_length // cfg.pieces_per_sequence
    rows = []
    for b in range(cfg.batch_size):
        row = []
        for p in range(cfg.pieces_per_sequence):
            k = (step * cfg.batch_size + b) * cfg.pieces_per_sequence + p
            seed = 10_000_000 + cfg.seed * 1_000_003 + k
            kind = (p + b) % 4
            if cfg.copy_span and kind == 1:
                row += copy_piece(piece, seed, tokenizer, haystack, cfg.copy_span)
            elif cfg.copy_warmup_steps and kind == 3:  # keeps the warm-up's copy heads alive
                row += copy_warmup_row(piece, f"mix:{cfg.seed}:{k}", tokenizer)
            else:
                row += generate(TRAIN_TASKS[(k // 2) % len(TRAIN_TASKS)], piece, seed, tokenizer, haystack).ids
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)
