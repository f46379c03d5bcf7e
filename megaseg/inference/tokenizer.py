"""Text <-> token ids for generation: a sentencepiece model or a Hugging Face tokenizer.json."""
from __future__ import annotations

import json
from pathlib import Path

from megaseg.checkpoint.errors import CheckpointError


class TextTokenizer:
    """encode(text) -> ids (with BOS when the tokenizer defines one), decode(ids) -> text."""

    def __init__(self, encode_fn, decode_fn, bos_id: int | None, eos_id: int | None, vocab_size: int):
        self._encode, self._decode = encode_fn, decode_fn
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._encode(text))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        """Text of ``ids``; EOS and ids past the tokenizer's vocabulary (a padded model
        vocabulary) are left out."""
        return self._decode([int(i) for i in ids if int(i) != self.eos_id and 0 <= int(i) < self.vocab_size])

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """From a sentencepiece ``.model`` file or a directory with tokenizer.model / tokenizer.json."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.model").is_file():
                return cls._sentencepiece(p / "tokenizer.model")
            if (p / "tokenizer.json").is_file():
                return cls._hf_json(p)
            raise CheckpointError(f"{p}: no tokenizer.model or tokenizer.json (pass --tokenizer)")
        if p.is_file() and p.suffix == ".model":
            return cls._sentencepiece(p)
        if p.is_file() and p.name.endswith(".json"):
            return cls._hf_json(p.parent, p)
        raise CheckpointError(f"{p}: not a tokenizer (a sentencepiece .model, tokenizer.json, or a directory with one)")

    @classmethod
    def _sentencepiece(cls, path: Path) -> "TextTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError):
            raise CheckpointError(f"{path}: not a readable sentencepiece model") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls(sp.EncodeAsIds, sp.DecodeIds, bos if bos >= 0 else None, eos if eos >= 0 else None, sp.GetPieceSize())

    @classmethod
    def _hf_json(cls, directory: Path, file: Path | None = None) -> "TextTokenizer":
        from tokenizers import Tokenizer

        file = file or directory / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception:
            raise CheckpointError(f"{file}: not a readable tokenizer.json") from None
        special = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            special = json.loads(cfg_path.read_text())

        def token_id(key):
            t = special.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None

        add_bos = special.get("add_bos_token", True)
        bos = token_id("bos_token") if add_bos else None
        return cls(lambda s: tok.encode(s, add_special_tokens=False).ids,
                   lambda ids: tok.decode(ids, skip_special_tokens=True),
                   bos, token_id("eos_token"), tok.get_vocab_size())
