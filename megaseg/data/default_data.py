"""The embedded default dataset, end to end: stdlib corpus -> tokenizer -> indexed dataset.

    prepare_default_data("data/default")
    # data/default/corpus.jsonl, tokenizer.model/.vocab, stdlib_text_document.bin/.idx,
    # manifest.json (written last: its presence means the directory is complete)

Calling it again with the same settings returns at once; different settings rebuild.
With ``tokenizer_model`` the corpus is tokenized with that tokenizer (a sentencepiece
model, or a Hugging Face tokenizer directory or tokenizer.json; copied in) instead of a
freshly trained one; `default_data_dir_for` gives such a build a directory of
its own, named by the tokenizer's hash.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from megaseg.data.corpus import DEFAULT_MIN_BYTES, stdlib_documents, write_jsonl
from megaseg.data.preprocess import preprocess_jsonl
from megaseg.data.tokenizer import HuggingFaceTokenizer, load_tokenizer, train_tokenizer

# The files of a Hugging Face tokenizer that travel with it (and with every checkpoint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DefaultDataSettings:
    vocab_size: int = 4096
    tokenizer_train_chars: int = 2_000_000
    min_bytes: int = DEFAULT_MIN_BYTES
    max_bytes: int | None = None
    python_version: str = platform.python_version()
    tokenizer_sha256: str | None = None  # a given tokenizer instead of a trained one


@dataclass(frozen=True)
class DefaultData:
    """Absolute paths of a prepared default dataset, plus its size."""

    directory: Path
    tokenizer_model: Path
    data_prefix: str
    documents: int
    tokens: int


def _load(directory: Path, settings: DefaultDataSettings) -> DefaultData | None:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("settings") != asdict(settings):
        return None
    data = DefaultData(
        directory=directory,
        tokenizer_model=directory / manifest["tokenizer_model"],
        data_prefix=str(directory / manifest["data_prefix"]),
        documents=manifest["documents"],
        tokens=manifest["tokens"],
    )
    files = [data.tokenizer_model, Path(data.data_prefix + ".bin"), Path(data.data_prefix + ".idx")]
    return data if all(f.exists() for f in files) else None


def _sha256(path: str | Path) -> str:
    """Hash of a tokenizer: the file, or the tokenizer files of a directory."""
    p = Path(path)
    if p.is_file() and not p.name.endswith(".json"):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    directory = p.parent if p.is_file() else p
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return digest.hexdigest()


def default_data_dir_for(base: str | Path, tokenizer_model: str | Path | None) -> str:
    """``base`` for the embedded tokenizer; ``base-<hash>`` for the corpus under another one."""
    return str(base) if tokenizer_model is None else f"{base}-{_sha256(tokenizer_model)[:12]}"


def prepare_default_data(
    output_dir: str | Path,
    settings: DefaultDataSettings = DefaultDataSettings(),
    workers: int = 2,
    log=print,
    tokenizer_model: str | Path | None = None,
    tokenizer_type: str | None = None,
) -> DefaultData:
    """Build (or find already built) the default dataset in `output_dir` (tokenized with
    ``tokenizer_model`` when given, else with a tokenizer trained on the corpus)."""
    if tokenizer_model is not None:
        settings = DefaultDataSettings(**{**asdict(settings), "tokenizer_sha256": _sha256(tokenizer_model)})
    directory = Path(output_dir).resolve()
    existing = _load(directory, settings)
    if existing is not None:
        log(f"default data already prepared in {directory} ({existing.documents} documents, {existing.tokens} tokens)")
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)

    corpus = _write_corpus(directory, settings, log)
    model = _tokenizer(directory, settings, tokenizer_model, tokenizer_type, log)
    result = preprocess_jsonl(corpus, model, directory / "stdlib", workers=workers)
    prefix = result.prefixes["text"]
    tokens = result.tokens["text"]
    log(f"indexed dataset: {result.documents} documents, {tokens} tokens -> {prefix}.bin/.idx")

    manifest = {
        "settings": asdict(settings),
        "tokenizer_model": model.name,
        "data_prefix": Path(prefix).name,
        "documents": result.documents,
        "tokens": tokens,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return DefaultData(directory, model, prefix, result.documents, tokens)


def _write_corpus(directory: Path, settings: DefaultDataSettings, log) -> Path:
    """The stdlib corpus of ``settings`` as ``corpus.jsonl`` in ``directory``."""
    corpus = directory / "corpus.jsonl"
    documents = write_jsonl(
        stdlib_documents(min_bytes=settings.min_bytes, max_bytes=settings.max_bytes), corpus
    )
    if documents == 0:
        raise ValueError(
            f"the stdlib corpus is empty with min_bytes={settings.min_bytes}, max_bytes={settings.max_bytes}"
        )
    log(f"corpus: {documents} stdlib source files -> {corpus}")
    return corpus


def _tokenizer(directory: Path, settings: DefaultDataSettings, tokenizer_model: str | Path | None,
               tokenizer_type: str | None, log) -> Path:
    """The tokenizer in ``directory``: ``tokenizer_model``'s files copied in (a Hugging Face
    tokenizer's into ``tokenizer/``, a sentencepiece model as ``tokenizer.model``), else
    one trained on the corpus."""
    if tokenizer_model is not None and isinstance(load_tokenizer(tokenizer_model, tokenizer_type), HuggingFaceTokenizer):
        source = Path(tokenizer_model)
        source = source.parent if source.is_file() else source
        model = directory / "tokenizer"
        model.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES[:3]:
            if (source / name).is_file():
                shutil.copyfile(source / name, model / name)
        log(f"tokenizer: {tokenizer_model} (given, Hugging Face)")
    elif tokenizer_model is not None:
        source = Path(tokenizer_model)
        model = directory / "tokenizer.model"
        shutil.copyfile(source / "tokenizer.model" if source.is_dir() else source, model)
        log(f"tokenizer: {tokenizer_model} (given)")
    else:
        model = _train_default_tokenizer(directory, settings)
        log(f"tokenizer: vocab {settings.vocab_size} -> {model}")
    return model


def _train_default_tokenizer(directory: Path, settings: DefaultDataSettings) -> Path:
    """A sentencepiece model trained on an evenly spaced subset of the corpus documents, so
    the sample covers the whole library."""
    texts = [d.text for d in stdlib_documents(min_bytes=settings.min_bytes, max_bytes=settings.max_bytes)]
    stride = max(1, round(sum(map(len, texts)) / settings.tokenizer_train_chars))
    training_text, budget = [], settings.tokenizer_train_chars
    for text in texts[::stride]:
        lines = [line for line in text.splitlines() if line.strip()]
        training_text.extend(lines)
        budget -= sum(map(len, lines))
        if budget <= 0:
            break
    return train_tokenizer(training_text, directory / "tokenizer", vocab_size=settings.vocab_size)
