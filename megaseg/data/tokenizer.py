"""Tokenizers for training: sentencepiece models and Hugging Face ``tokenizer.json``.

megatron-core's `GPTDatasetConfig.tokenizer` is duck-typed: `GPTDataset` reads `eod`
(document separator), `pad` (masked out of the loss), `vocab_size`, and
`unique_identifiers` (hashed into the dataset cache key). `SentencePieceTokenizer` and
`HuggingFaceTokenizer` provide those plus `tokenize`/`detokenize`, `bos`, `eos`,
`vocab`, `inv_vocab`, `special_ids()` and `path` (the file or directory to copy into
checkpoints). `load_tokenizer` picks the class from Megatron's ``--tokenizer-type`` names
or from what the path holds.

Special ids of megaseg's own sentencepiece models are fixed at training time: pad 0,
unk 1, bos 2, eos 3; eod is eos.
Training keeps text byte-exact: identity normalization, no dummy prefix, whitespace kept,
and byte fallback so any UTF-8 (newlines, tabs, rare characters) round-trips.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_NUM_SPECIAL = 4
_NUM_BYTE_PIECES = 256


class TokenizerError(ValueError):
    """A tokenizer model or training request that cannot work; the message says why."""


def _load_processor(model_path: str | Path):
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer model not found: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path} is not a sentencepiece model ({exc})") from None
    return processor


class SentencePieceTokenizer:
    """A trained sentencepiece model.

    Args:
        model_path: the `.model` file written by `train_tokenizer`.
    """

    TYPE = "SentencePieceTokenizer"

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        self.path = self.model_path
        self._sp = _load_processor(self.model_path)
        digest = hashlib.sha256(self.model_path.read_bytes()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_sha256", digest)]
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.IdToPiece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: self._sp.IdToPiece(i) for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.Encode(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def _special(self, piece_id: int, name: str) -> int:
        if piece_id < 0:
            raise AttributeError(f"{self.model_path} has no {name} token")
        return piece_id

    @property
    def pad(self) -> int:
        return self._special(self._sp.pad_id(), "pad")

    @property
    def unk(self) -> int:
        return self._special(self._sp.unk_id(), "unk")

    @property
    def bos(self) -> int:
        return self._special(self._sp.bos_id(), "bos")

    @property
    def eos(self) -> int:
        return self._special(self._sp.eos_id(), "eos")

    @property
    def eod(self) -> int:
        """End of document: the eos token."""
        return self.eos

    @property
    def has_byte_fallback(self) -> bool:
        return all(self._sp.PieceToId(f"<0x{b:02X}>") != self.unk for b in range(256))

    def special_ids(self) -> dict[str, int | None]:
        """bos/eos/pad/eod ids (None where the model has none)."""
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
        return {**ids, "eod": ids["eos"]}

    def describe(self) -> str:
        """One line: vocabulary size, special ids and byte fallback."""
        return (
            f"{self.model_path}: vocab_size={self.vocab_size} pad={self._sp.pad_id()} "
            f"unk={self._sp.unk_id()} bos={self._sp.bos_id()} eos={self._sp.eos_id()} "
            f"byte_fallback={self.has_byte_fallback}"
        )


class HuggingFaceTokenizer:
    """A Hugging Face fast tokenizer: ``tokenizer.json`` (with ``tokenizer_config.json``
    beside it naming the special tokens, as every Hub checkpoint has).

    Args:
        path: a directory holding ``tokenizer.json``, or the ``tokenizer.json`` file itself.

    Text is encoded without special tokens (BOS/EOS are the preprocessing's business:
    ``--append-bos``/``--append-eod``). eod is the eos token. A pad token equal to eos (Qwen
    names ``<|endoftext|>`` as both) is not a pad for the datasets: `pad` is then -1, which
    never occurs, so eod keeps its loss.
    """

    TYPE = "HuggingFaceTokenizer"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        p = Path(path)
        if p.is_dir():
            directory, file = p, p / "tokenizer.json"
        else:
            directory, file = p.parent, p
        if not file.is_file():
            raise TokenizerError(f"{p}: no tokenizer.json (a Hugging Face tokenizer is a directory with tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({str(exc).splitlines()[0][:120]})") from None
        self.path = directory
        self.file = file
        cfg_path = directory / "tokenizer_config.json"
        try:
            self._config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except ValueError:
            raise TokenizerError(f"{cfg_path}: not valid JSON") from None
        digest = hashlib.sha256(file.read_bytes())
        digest.update(json.dumps(self.special_ids(), sort_keys=True).encode())
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("model_sha256", digest.hexdigest())])

    def _token_id(self, key: str) -> int | None:
        token = self._config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if not token:
            return None
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.path}: tokenizer_config.json names {key}={token!r}, which is not in the vocabulary")
        return tid

    def special_ids(self) -> dict[str, int | None]:
        ids = {k: self._token_id(f"{k}_token") for k in ("bos", "eos", "pad")}
        return {**ids, "eod": ids["eos"]}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _special(self, name: str) -> int:
        tid = self.special_ids()[name]
        if tid is None:
            raise AttributeError(f"{self.path} has no {name} token")
        return tid

    @property
    def bos(self) -> int:
        return self._special("bos")

    @property
    def eos(self) -> int:
        return self._special("eos")

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def pad(self) -> int:
        ids = self.special_ids()
        return ids["pad"] if ids["pad"] is not None and ids["pad"] != ids["eos"] else -1

    def describe(self) -> str:
        ids = self.special_ids()
        return f"{self.path}: vocab_size={self.vocab_size} " + " ".join(f"{k}={v}" for k, v in ids.items())


TOKENIZER_TYPES = (SentencePieceTokenizer.TYPE, HuggingFaceTokenizer.TYPE)


def tokenizer_type_of(path: str | Path) -> str:
    """The tokenizer type a path holds: a sentencepiece ``.model`` file (or a directory with
    ``tokenizer.model`` and no ``tokenizer.json``), else a Hugging Face tokenizer."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HuggingFaceTokenizer.TYPE
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer.TYPE
        raise TokenizerError(f"{p}: no tokenizer.json or tokenizer.model in this directory")
    if not p.exists():
        raise TokenizerError(f"tokenizer not found: {p}")
    if p.name.endswith(".json"):
        return HuggingFaceTokenizer.TYPE
    return SentencePieceTokenizer.TYPE


def load_tokenizer(path: str | Path, tokenizer_type: str | None = None):
    """A `SentencePieceTokenizer` or `HuggingFaceTokenizer` for ``path`` (a file or a
    directory); ``tokenizer_type`` (Megatron's name) must agree with what the path holds."""
    found = tokenizer_type_of(path)
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"tokenizer_type={tokenizer_type!r} is invalid: allowed {', '.join(TOKENIZER_TYPES)}")
    p = Path(path)
    if tokenizer_type == SentencePieceTokenizer.TYPE and found != tokenizer_type:
        if p.is_dir() and (p / "tokenizer.model").is_file():
            found = tokenizer_type
        else:
            raise TokenizerError(f"tokenizer_type=SentencePieceTokenizer is invalid for {p}: it holds a Hugging Face "
                                 "tokenizer.json (pass --tokenizer-type HuggingFaceTokenizer)")
    if tokenizer_type == HuggingFaceTokenizer.TYPE and found != tokenizer_type:
        raise TokenizerError(f"tokenizer_type=HuggingFaceTokenizer is invalid for {p}: it is a sentencepiece model "
                             "(pass --tokenizer-type SentencePieceTokenizer)")
    if found == SentencePieceTokenizer.TYPE:
        return SentencePieceTokenizer(p / "tokenizer.model" if p.is_dir() else p)
    return HuggingFaceTokenizer(p)


def validate_tokenizer(model_path: str | Path, require_byte_fallback: bool = True, tokenizer_type: str | None = None):
    """Load a tokenizer and check it has the special tokens megaseg's datasets need."""
    tokenizer = load_tokenizer(model_path, tokenizer_type)
    try:
        tokenizer.eos
    except AttributeError as exc:
        raise TokenizerError(f"{exc}; megaseg ends documents with eos") from None
    if isinstance(tokenizer, SentencePieceTokenizer):
        # pad is optional (Llama's tokenizer has none): megatron's datasets then pad with -1,
        # which never occurs, since sequences are packed from the indexed dataset.
        if tokenizer._sp.pad_id() >= 0 and tokenizer.pad == tokenizer.eod:
            raise TokenizerError(f"{model_path}: pad and eod share id {tokenizer.pad}")
        if require_byte_fallback and not tokenizer.has_byte_fallback:
            raise TokenizerError(f"{model_path} has no byte fallback pieces; retrain with byte_fallback")
    return tokenizer


def iter_training_lines(files: Iterable[str | Path], max_chars: int | None = None) -> Iterator[str]:
    """Non-empty lines of `files` in order, stopping once `max_chars` characters were yielded."""
    total = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                yield line
                total += len(line)
                if max_chars is not None and total >= max_chars:
                    return


def train_tokenizer(
    lines: Iterable[str],
    output_prefix: str | Path,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
) -> Path:
    """Train a sentencepiece model on `lines`; writes `<prefix>.model` and `<prefix>.vocab`.

    Returns the `.model` path. Raises TokenizerError for a vocabulary the corpus cannot
    fill or an empty corpus.
    """
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise TokenizerError(f"model_type must be one of bpe, unigram, char, word; got {model_type!r}")
    minimum = _NUM_SPECIAL + (_NUM_BYTE_PIECES if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: at least {minimum} with "
            f"byte_fallback={byte_fallback}"
        )
    lines = list(lines)
    if not lines:
        raise TokenizerError("no training text: the inputs contain no non-empty lines")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = _train_model(lines, vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
                         character_coverage=character_coverage, num_threads=num_threads)
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    model_path.write_bytes(model)
    _write_vocab(SentencePieceTokenizer(model_path), output_prefix.with_name(output_prefix.name + ".vocab"))
    return model_path


def _train_model(lines: list[str], **options) -> bytes:
    """The serialized sentencepiece model trained on ``lines`` with megaseg's fixed settings
    (byte-exact text, the special ids above) and ``options``."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            **options,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 14,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            minloglevel=2,
        )
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"sentencepiece training failed: {message}") from None
    return model.getvalue()


def _write_vocab(tokenizer: SentencePieceTokenizer, vocab_path: Path) -> None:
    """One line per id, its piece and score separated by a tab (sentencepiece's ``.vocab``)."""
    with open(vocab_path, "w", encoding="utf-8") as handle:
        for piece_id in range(tokenizer.vocab_size):
            handle.write(f"{tokenizer._sp.IdToPiece(piece_id)}\t{tokenizer._sp.GetScore(piece_id)}\n")
