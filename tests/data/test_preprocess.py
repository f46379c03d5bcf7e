"""JSONL -> .bin/.idx through megatron-core's IndexedDatasetBuilder, and back (other formats: test_sources.py)."""

import json

import pytest

from megaseg.data.corpus import write_jsonl
from megaseg.data.preprocess import DataError, check_input, preprocess_jsonl

from .conftest import ASCII_DOCS, load_tool, run_tool


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))], dataset


@pytest.mark.parametrize("workers", [1, 2])
def test_token_ids_round_trip_through_indexed_dataset(tmp_path, tokenizer, small_corpus, workers):
    docs = ASCII_DOCS + small_corpus
    write_jsonl(docs, tmp_path / "docs.jsonl")
    result = preprocess_jsonl(
        tmp_path / "docs.jsonl", tokenizer.model_path, tmp_path / "out" / "corpus", workers=workers
    )
    assert result.prefixes == {"text": str(tmp_path / "out" / "corpus_text_document")}
    assert result.documents == len(docs)

    stored, dataset = _read_back(result.prefixes["text"])
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in docs]
    assert stored == expected
    assert result.tokens["text"] == sum(map(len, expected))
    assert list(dataset.document_indices) == list(range(len(docs) + 1))
    for ids, text in zip(stored, docs):
        assert tokenizer.detokenize(ids[:-1]) == text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
    ]


def test_each_json_key_becomes_its_own_dataset_without_eod(tmp_path, tokenizer):
    rows = [{"text": "alpha beta", "title": "first"}, {"text": "gamma", "title": "second one"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = preprocess_jsonl(
        tmp_path / "rows.jsonl", tokenizer.model_path, tmp_path / "kv", json_keys=("text", "title"), append_eod=False
    )
    for key in ("text", "title"):
        stored, _ = _read_back(result.prefixes[key])
        assert stored == [tokenizer.tokenize(r[key]) for r in rows]


def test_bad_inputs_raise_data_errors_naming_file_and_line(tmp_path, tokenizer):
    with pytest.raises(DataError, match="input not found"):
        check_input(tmp_path / "absent.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="input is empty"):
        check_input(tmp_path / "blank.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"nokey.jsonl:2: no key 'text' \(keys: body\)"):
        check_input(tmp_path / "nokey.jsonl")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"num.jsonl:1: 'text' is int, expected a string"):
        preprocess_jsonl(tmp_path / "num.jsonl", tokenizer.model_path, tmp_path / "x")
    assert not list(tmp_path.glob("x*"))


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_cli_writes_megatron_named_outputs(tmp_path, tokenizer, capsys):
    data = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in ASCII_DOCS])
    tool = load_tool("preprocess_data")
    status = tool.main([
        "--input", data, "--json-keys", "text", "--tokenizer-model", str(tokenizer.model_path),
        "--output-prefix", str(tmp_path / "o"), "--append-eod", "--workers", "2",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert f"text: {len(ASCII_DOCS)} documents" in out
    stored, _ = _read_back(str(tmp_path / "o_text_document"))
    assert stored == [tokenizer.tokenize(t) + [tokenizer.eod] for t in ASCII_DOCS]


def test_cli_errors_are_one_line_messages_with_exit_status_2(tmp_path, tokenizer):
    good = _jsonl(tmp_path / "good.jsonl", ['{"text": "fine"}'])
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    bad = _jsonl(tmp_path / "bad.jsonl", ['{"text": "one"}', '{"text": "two"}', '{"text": "three",}'])
    model = str(tokenizer.model_path)
    cases = {
        "missing input": (
            ["--input", str(tmp_path / "absent.jsonl"), "--tokenizer-model", model],
            f"input not found: {tmp_path / 'absent.jsonl'}",
        ),
        "empty input": (
            ["--input", empty, "--tokenizer-model", model],
            f"input is empty: {empty} has no documents",
        ),
        "bad json line": (
            ["--input", bad, "--tokenizer-model", model],
            f"{bad}:3: invalid JSON (Expecting property name enclosed in double quotes at column 18)",
        ),
        "missing tokenizer": (
            ["--input", good, "--tokenizer-model", str(tmp_path / "none.model")],
            f"tokenizer not found: {tmp_path / 'none.model'}",
        ),
    }
    for case, (args, message) in cases.items():
        ran = run_tool("preprocess_data", *args, "--output-prefix", str(tmp_path / "out"))
        assert ran.returncode == 2, case
        assert ran.stderr.strip() == f"preprocess_data.py: error: {message}", case
        assert ran.stdout == "", case
    assert not list(tmp_path.glob("out*"))


def test_check_input_takes_several_inputs_and_directories(tmp_path):
    from megaseg.data.preprocess import preprocess

    assert preprocess is preprocess_jsonl
    write_jsonl(ASCII_DOCS, tmp_path / "a.jsonl")
    (tmp_path / "more").mkdir()
    write_jsonl(ASCII_DOCS[:2], tmp_path / "more" / "b.jsonl")
    (tmp_path / "more" / "c.txt").write_text("one document")
    assert check_input([tmp_path / "a.jsonl", tmp_path / "more"]) == len(ASCII_DOCS) + 3
    assert check_input(str(tmp_path / "*.jsonl")) == len(ASCII_DOCS)
