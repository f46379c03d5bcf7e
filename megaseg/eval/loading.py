"""The one entry point that turns a checkpoint path into (model, tokenizer) for evaluation.

Every evaluator and tool loads through ``load_for_eval``; supporting another checkpoint
format means changing ``load_weights`` only.
"""
from __future__ import annotations

import json
from pathlib import Path

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import read_model
from megaseg.inference.tokenizer import TextTokenizer

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS 256, EOS 257 (vocabulary 258).

    Used by the small alignment experiment: it needs no training and encodes any text the
    same way in every piece, so needles and haystack lines concatenate exactly.
    """

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory, BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "bos_id": 256, "eos_id": 257}) + "\n")


def load_tokenizer(path: str | Path):
    """ByteTokenizer when ``path`` holds byte_tokenizer.json, else a sentencepiece or
    tokenizer.json tokenizer; CheckpointError (one line) when there is none."""
    p = Path(path)
    if p.is_dir() and (p / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise CheckpointError(f"{p}: checkpoint has no tokenizer (tokenizer.model, tokenizer.json or "
                              f"{BYTE_TOKENIZER_FILE}); pass a tokenizer path")
    return TextTokenizer.load(p)


def load_weights(path: str | Path):
    """The reference model of a checkpoint in any format `megaseg.checkpoint.formats` reads
    (pretraining checkpoint at any layout, megaseg model directory, HF directory)."""
    return read_model(path).build().eval()


def load_for_eval(path: str | Path, tokenizer: str | Path | None = None):
    """(model, tokenizer) of a checkpoint; the tokenizer is read from ``tokenizer`` if given,
    else from the checkpoint (a pretraining checkpoint carries its sentencepiece model)."""
    source = read_model(path)
    if tokenizer is None and not (Path(path) / BYTE_TOKENIZER_FILE).is_file() and source.tokenizer is not None:
        tokenizer = source.tokenizer
    return source.build().eval(), load_tokenizer(tokenizer or path)
