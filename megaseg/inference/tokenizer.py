"""Text <-> token ids for generation and evaluation: a sentencepiece model or a Hugging Face
tokenizer.json.

Whether a text starts with BOS follows what the model was trained on, not the tokenizer
alone (`model_adds_bos`): a megaseg pretraining checkpoint never saw a BOS (its samples are
the preprocessed documents, packed as they are), so its tokenizer adds none; other
checkpoints follow ``add_bos_token`` of the tokenizer_config.json beside the tokenizer
(an HF export writes it), else a sentencepiece tokenizer adds its BOS as Llama's does.
"""
from __future__ import annotations

import json
from pathlib import Path

from megaseg.checkpoint.errors import CheckpointError

TOKENIZER_CONFIG = "tokenizer_config.json"


def model_adds_bos(source) -> bool | None:
    """Whether the inputs of the model a `ModelSource` (or a format name) holds start with
    BOS: False for a megaseg pretraining checkpoint (pretraining adds no BOS to its samples,
    and the default data has none), None for the other formats (the tokenizer's own
    ``add_bos_token`` decides)."""
    from megaseg.checkpoint.formats import TRAINING

    fmt = source if isinstance(source, str) else getattr(source, "format", None)
    return False if fmt == TRAINING else None


def configured_add_bos(directory: str | Path) -> bool | None:
    """``add_bos_token`` of the tokenizer_config.json in ``directory`` (None when absent)."""
    cfg_path = Path(directory) / TOKENIZER_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        value = json.loads(cfg_path.read_text()).get("add_bos_token")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{cfg_path}: not a readable JSON object") from None
    return None if value is None else bool(value)


class TextTokenizer:
    """encode(text) -> ids (with BOS when the model's inputs start with one), decode(ids) -> text.

    ``bos_id`` is the BOS that inputs start with: None when the tokenizer has none or the
    model was trained without it (``add_bos`` False).
    """

    def __init__(self, encode_fn, decode_fn, bos_id: int | None, eos_id: int | None, vocab_size: int,
                 add_bos: bool = True):
        self._encode, self._decode = encode_fn, decode_fn
        self.add_bos = bool(add_bos) and bos_id is not None
        self.bos_id = bos_id if self.add_bos else None
        self.eos_id, self.vocab_size = eos_id, vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._encode(text))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        """Text of ``ids``; EOS and ids past the tokenizer's vocabulary (a padded model
        vocabulary) are left out."""
        return self._decode([int(i) for i in ids if int(i) != self.eos_id and 0 <= int(i) < self.vocab_size])

    @classmethod
    def load(cls, path: str | Path, add_bos: bool | None = None) -> "TextTokenizer":
        """From a sentencepiece ``.model`` file or a directory with tokenizer.model / tokenizer.json.

        ``add_bos``: whether inputs start with BOS; None reads ``add_bos_token`` of the
        tokenizer_config.json beside the tokenizer (default True). Pass
        ``model_adds_bos(source)`` to follow the checkpoint the tokenizer belongs to.
        """
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.model").is_file():
                return cls._sentencepiece(p / "tokenizer.model", add_bos)
            if (p / "tokenizer.json").is_file():
                return cls._hf_json(p, add_bos=add_bos)
            raise CheckpointError(f"{p}: no tokenizer.model or tokenizer.json (pass --tokenizer)")
        if p.is_file() and p.suffix == ".model":
            return cls._sentencepiece(p, add_bos)
        if p.is_file() and p.name.endswith(".json"):
            return cls._hf_json(p.parent, p, add_bos)
        raise CheckpointError(f"{p}: not a tokenizer (a sentencepiece .model, tokenizer.json, or a directory with one)")

    @classmethod
    def _sentencepiece(cls, path: Path, add_bos: bool | None = None) -> "TextTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError):
            raise CheckpointError(f"{path}: not a readable sentencepiece model") from None
        if add_bos is None:
            add_bos = configured_add_bos(path.parent)
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls(sp.EncodeAsIds, sp.DecodeIds, bos if bos >= 0 else None, eos if eos >= 0 else None, sp.GetPieceSize(),
                   add_bos=True if add_bos is None else add_bos)

    @classmethod
    def _hf_json(cls, directory: Path, file: Path | None = None, add_bos: bool | None = None) -> "TextTokenizer":
        from tokenizers import Tokenizer

        file = file or directory / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception:
            raise CheckpointError(f"{file}: not a readable tokenizer.json") from None
        special = {}
        cfg_path = directory / TOKENIZER_CONFIG
        if cfg_path.is_file():
            special = json.loads(cfg_path.read_text())

        def token_id(key):
            t = special.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None

        if add_bos is None:
            add_bos = special.get("add_bos_token", True)
        return cls(lambda s: tok.encode(s, add_special_tokens=False).ids,
                   lambda ids: tok.decode(ids, skip_special_tokens=True),
                   token_id("bos_token"), token_id("eos_token"), tok.get_vocab_size(), add_bos=bool(add_bos))
