"""A tiny tokenizer and corpus shared by the data-pipeline tests."""

import sys
from pathlib import Path

import pytest

from megaseg.data.corpus import stdlib_documents
from megaseg.data.tokenizer import SentencePieceTokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]

ASCII_DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Plain ASCII prose, with punctuation; numbers 12345 and    runs of spaces.\n\n\tTabbed line.",
    "x = [i * i for i in range(10)]  # trailing comment",
]


def run_tool(name: str, *args: str):
    """Run tools/<name>.py in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def load_tool(name: str):
    """Import tools/<name>.py as a module (to call its main() in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"megaseg_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def small_corpus():
    """Five long stdlib source files (deterministic)."""
    return [d.text for d in stdlib_documents(max_documents=5)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, small_corpus):
    lines = [line for text in small_corpus + ASCII_DOCS for line in text.splitlines() if line.strip()]
    model = train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tiny", vocab_size=512)
    return SentencePieceTokenizer(model)
