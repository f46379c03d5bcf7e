"""The embedded stdlib corpus: deterministic, long documents, no third-party code."""

import json

from megaseg.data.corpus import DEFAULT_MIN_BYTES, stdlib_documents, stdlib_source_files, write_jsonl


def test_stdlib_corpus_is_sorted_long_and_excludes_installed_packages():
    files = stdlib_source_files()
    assert len(files) > 100
    names = [d.name for d in stdlib_documents(max_documents=50)]
    assert names == sorted(names)
    assert not any(part in ("site-packages", "dist-packages") for name in names for part in name.split("/"))
    assert all(path.stat().st_size >= DEFAULT_MIN_BYTES for path in files)


def test_stdlib_corpus_is_identical_across_calls():
    first = [(d.name, d.text) for d in stdlib_documents(max_documents=20)]
    second = [(d.name, d.text) for d in stdlib_documents(max_documents=20)]
    assert first == second


def test_caps_limit_documents_and_bytes():
    assert len(list(stdlib_documents(max_documents=3))) == 3
    capped = list(stdlib_documents(max_bytes=200_000))
    assert capped and sum(len(d.text.encode()) for d in capped) <= 200_000
    uncapped_prefix = [d.name for d in stdlib_documents(max_documents=len(capped) + 1)]
    assert [d.name for d in capped] == uncapped_prefix[: len(capped)]
    small = list(stdlib_documents(min_bytes=0, max_documents=200))
    assert min(len(d.text.encode()) for d in small) < DEFAULT_MIN_BYTES


def test_write_jsonl_keeps_text_exactly(tmp_path):
    docs = list(stdlib_documents(max_documents=3)) + ["unicode: é ✓ \u2028 end\n"]
    path = tmp_path / "c.jsonl"
    assert write_jsonl(docs, path) == 4
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 5
    texts = [json.loads(line)["text"] for line in lines[:-1]]
    assert texts == [d.text for d in docs[:3]] + [docs[3]]
