"""Every input format -> the same token ids; one-line errors naming the file; tiny datasets' splits."""

import gzip
import io
import json
import sys

import pytest

from megaseg.data import source_arrow, source_text
from megaseg.data.preprocess import DataError, _Progress, check_input, preprocess_jsonl
from megaseg.data.sources import count_documents, iter_documents, resolve_inputs

from .conftest import ASCII_DOCS, load_tool

DOCS = ASCII_DOCS + [
    "naïve café — ünïcödé ✓ and emoji 🙂",
    "two\nlines\n",
    "a {\"quoted\": [json, like]} text\twith tab",
    "last one",
]
OTHER = ["held-out text that must not appear", "another test document"]


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _records(docs):
    return [{"id": i, "text": text, "meta": {"n": i}} for i, text in enumerate(docs)]


def _jsonl_bytes(docs):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(docs)).encode("utf-8")


def _write_parquet(path, docs, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(docs))), "text": list(docs)})
    pq.write_table(table, path, row_group_size=row_group_size)


# ---- one builder per format: each writes DOCS (and maybe decoys) and returns the input(s) -------


def _jsonl(root):
    (root / "docs.jsonl").write_bytes(_jsonl_bytes(DOCS))
    return root / "docs.jsonl"


def _jsonl_gz(root):
    with gzip.open(root / "docs.jsonl.gz", "wb") as handle:
        handle.write(_jsonl_bytes(DOCS))
    return root / "docs.jsonl.gz"


def _jsonl_zst(root):
    zstandard = pytest.importorskip("zstandard")
    data = _jsonl_bytes(DOCS)
    half = data.index(b"\n", len(data) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    # two frames, as concatenated `zstd` outputs are
    (root / "docs.jsonl.zst").write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
    return root / "docs.jsonl.zst"


def _json_array(root):
    (root / "docs.json").write_text(json.dumps(_records(DOCS), indent=2, ensure_ascii=False), encoding="utf-8")
    return root / "docs.json"


def _txt_directory(root):
    for i, text in enumerate(DOCS):
        sub = root / "books" / ("a" if i < 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "books" / "README.md").write_text("not a document")  # other files are ignored
    return root / "books"


def _txt_glob(root):
    _txt_directory(root)
    return f"{root}/books/*/*.txt"


def _jsonl_glob(root):
    for part, chunk in enumerate((DOCS[:4], DOCS[4:])):
        (root / f"part-{part}.jsonl").write_bytes(_jsonl_bytes(chunk))
    return f"{root}/part-*.jsonl"


def _parquet(root):
    _write_parquet(root / "docs.parquet", DOCS)
    return root / "docs.parquet"


def _saved_dataset(root):
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}).save_to_disk(str(root / "saved"))
    return root / "saved"


def _saved_dataset_dict(root):
    import datasets

    train = datasets.Dataset.from_dict({"text": DOCS})
    test = datasets.Dataset.from_dict({"text": OTHER})
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(root / "dict"))
    return root / "dict"


def _hub_folder(root):
    _write_parquet(root / "hub" / "data" / "train-00000-of-00002.parquet", DOCS[:5])
    _write_parquet(root / "hub" / "data" / "train-00001-of-00002.parquet", DOCS[5:])
    (root / "hub" / "data" / "test-00000-of-00001.jsonl").write_bytes(_jsonl_bytes(OTHER))
    (root / "hub" / "README.md").write_text("---\nlicense: mit\n---\n")
    return root / "hub"


def _mixed_inputs(root):
    (root / "first.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(DOCS[:2])))
    (root / "mid").mkdir()
    for i, text in enumerate(DOCS[2:5]):
        (root / "mid" / f"{i}.txt").write_text(text, encoding="utf-8")
    _write_parquet(root / "last.parquet", DOCS[5:])
    return [root / "first.jsonl.gz", str(root / "mid"), root / "last.parquet"]


FORMATS = {
    "jsonl": _jsonl, "jsonl.gz": _jsonl_gz, "jsonl.zst": _jsonl_zst, "json array": _json_array,
    "txt directory": _txt_directory, "txt glob": _txt_glob, "jsonl glob": _jsonl_glob, "parquet": _parquet,
    "save_to_disk": _saved_dataset, "DatasetDict": _saved_dataset_dict, "hub folder": _hub_folder,
    "several inputs": _mixed_inputs,
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_writes_the_same_token_ids(tmp_path, tokenizer, fmt, monkeypatch):
    monkeypatch.setattr(source_arrow, "_BATCH_ROWS", 3)  # several row batches per parquet/Arrow file
    inputs = FORMATS[fmt](tmp_path)
    assert check_input(inputs) == len(DOCS)
    result = preprocess_jsonl(inputs, tokenizer.model_path, tmp_path / "out" / "corpus")
    assert result.documents == len(DOCS)
    assert _read_back(result.prefixes["text"]) == [tokenizer.tokenize(t) + [tokenizer.eod] for t in DOCS]


def test_json_keys_select_fields_of_records(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "a", "title": "A"}, {"title": "B", "text": "b"}]))
    assert list(iter_documents(resolve_inputs(path), ["title", "text"])) == [("A", "a"), ("B", "b")]
    # a .json file that is not an array is read as JSON lines (Megatron-LM's --input corpus.json)
    path.write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert list(iter_documents(resolve_inputs(path))) == [("x",), ("y",)]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_json_arrays_stream_across_read_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(source_text, "_JSON_CHUNK", chunk)  # splits strings, numbers and UTF-8 sequences
    path = _json_array(tmp_path)
    assert [t for (t,) in iter_documents(resolve_inputs(path))] == DOCS
    path.write_bytes(b'[{"text": "a"},\n  {"text": "b", "n": 12345},\n {"text": 3}]')
    assert _error(path) == f"{path}:3: element 2: 'text' is int, expected a string"


def test_split_option_picks_other_splits(tmp_path):
    dict_dir, hub = _saved_dataset_dict(tmp_path), _hub_folder(tmp_path)
    for path in (dict_dir, hub):
        assert [t for (t,) in iter_documents(resolve_inputs(path, split="test"))] == OTHER
    names = [s.path.name for s in resolve_inputs(hub)]
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


# ---- errors: a one-line DataError naming the file -------------------------------------------


def _error(inputs, keys=("text",), split=None):
    with pytest.raises(DataError) as info:
        count_documents(resolve_inputs(inputs, split), keys)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_bad_paths_and_types(tmp_path):
    assert _error(tmp_path / "absent.jsonl") == f"input not found: {tmp_path / 'absent.jsonl'}"
    assert _error(f"{tmp_path}/*.jsonl") == f"no files match {tmp_path}/*.jsonl"
    (tmp_path / "data.csv").write_text("text\nx\n")
    message = _error(tmp_path / "data.csv")
    supported = "(supported: .jsonl, .jsonl.gz, .jsonl.zst, .json, .txt, .parquet, a directory"
    assert message.startswith(f"{tmp_path / 'data.csv'}: unsupported file type {supported}")
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty").startswith(f"{tmp_path / 'empty'}: no supported files in this directory")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "x"}\n')
    assert _error([good, tmp_path / "blank.jsonl"]) == f"input is empty: {tmp_path / 'blank.jsonl'} has no documents"


def test_bad_records_name_file_and_line_or_row(tmp_path, monkeypatch):
    cases = {
        "nokey.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', "nokey.jsonl:2: no key 'text' (keys: body)"),
        "num.jsonl": (b'{"text": "a"}\n\n{"text": 5}\n', "num.jsonl:3: 'text' is int, expected a string"),
        "bad.jsonl": (b'{"text": "a"}\n{"text": "b",}\n', "bad.jsonl:2: invalid JSON (Expecting property name"),
        "list.jsonl": (b'["text"]\n', "list.jsonl:1: expected a JSON object, got list"),
        "latin1.jsonl": ('{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), "latin1.jsonl:2: not UTF-8 text"),
        "latin1.txt": ("caf\u00e9".encode("latin-1"), "latin1.txt: not UTF-8 text (unexpected end of data at byte 3)"),
        "arr.json": (b'[\n {"text": "a"},\n {"text": null}\n]', "arr.json:3: element 1: 'text' is NoneType"),
        "broken.json": (b'[{"text": "a"}, {"text": "b"', "broken.json:1: invalid JSON in element 1"),
        "open.json": (b'[{"text": "a"},\n', "open.json:2: invalid JSON (the array is not closed)"),
        "trunc.jsonl.gz": (gzip.compress(_jsonl_bytes(DOCS))[:-12], "trunc.jsonl.gz: corrupt or truncated"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert _error(tmp_path / name).startswith(f"{tmp_path}/{expected}"), name
    monkeypatch.setattr(source_arrow, "_BATCH_ROWS", 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c", None]}), tmp_path / "null.parquet")
    assert _error(tmp_path / "null.parquet") == f"{tmp_path}/null.parquet: row 3: 'text' is null, expected a string"
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    assert _error(tmp_path / "int.parquet") == f"{tmp_path}/int.parquet: column 'text' is int64, expected a string"
    assert _error(tmp_path / "int.parquet", ["body"]) == f"{tmp_path}/int.parquet: no column 'body' (columns: text)"
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert _error(tmp_path / "fake.parquet").startswith(f"{tmp_path}/fake.parquet: not a readable parquet file")
    (tmp_path / "t.txt").write_text("x")
    assert _error(tmp_path / "t.txt", keys=["body"]).startswith(f"{tmp_path}/t.txt: a .txt file is one document")


def test_saved_dataset_errors(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    assert _error(tmp_path / "saved") == f"{tmp_path}/saved: no column 'text' (columns: body)"
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]}),
                          "b": datasets.Dataset.from_dict({"text": ["y"]})}).save_to_disk(str(tmp_path / "dict"))
    assert _error(tmp_path / "dict") == (
        f"{tmp_path}/dict: a DatasetDict without a 'train' split (splits: a, b); choose one with --split NAME"
    )
    assert _error(tmp_path / "dict", split="c") == f"{tmp_path}/dict: a DatasetDict without a 'c' split (splits: a, b)"
    assert list(iter_documents(resolve_inputs(tmp_path / "dict", split="b"))) == [("y",)]
    assert _error(_hub_folder(tmp_path), split="dev").startswith(f"{tmp_path}/hub: no 'dev' split among its files")


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert _error(tmp_path / "d.jsonl.zst") == (
        f"{tmp_path}/d.jsonl.zst: reading .zst needs the zstandard package: pip install zstandard"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_errors_found_while_streaming_leave_no_output(tmp_path, tokenizer, monkeypatch, workers):
    import megaseg.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "PRECHECK_BYTES", 0)  # no pre-pass: the error surfaces mid-run
    lines = [json.dumps({"text": f"document {i}"}) for i in range(200)] + ['{"text": 7}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"in.jsonl:201: 'text' is int, expected a string"):
        preprocess_jsonl(tmp_path / "in.jsonl", tokenizer.model_path, tmp_path / "out" / "x", workers=workers)
    assert list((tmp_path / "out").iterdir()) == []


def test_two_workers_write_the_same_files_as_one(tmp_path, tokenizer, small_corpus):
    docs = [f"{i}: " + DOCS[i % len(DOCS)] for i in range(150)] + small_corpus
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes(docs[:100]))
    _write_parquet(tmp_path / "b.parquet", docs[100:])
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        result = preprocess_jsonl([tmp_path / "a.jsonl", tmp_path / "b.parquet"], tokenizer.model_path, prefix,
                                  workers=workers)
        assert result.documents == len(docs)
        outputs.append([(tmp_path / f"w{workers}_text_document{s}").read_bytes() for s in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    assert _read_back(str(tmp_path / "w2_text_document")) == [tokenizer.tokenize(t) + [tokenizer.eod] for t in docs]


# ---- progress ------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_lines(monkeypatch):
    quiet = _Stream(tty=False)
    meter = _Progress(None, stream=quiet)
    meter.update(10, 100)
    meter.close(True)
    assert quiet.getvalue() == ""

    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: a plain line every interval
    plain = _Stream(tty=False)
    meter = _Progress(True, interval=0.0, stream=plain)
    meter.update(10, 100)
    meter.update(5, 50)
    meter.close(True)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("preprocess: 15 documents, 150 tokens")
    assert "documents/s" in lines[-1] and "tokens/s" in lines[-1]


def test_progress_bar_with_tqdm_on_a_terminal():
    pytest.importorskip("tqdm")
    tty = _Stream(tty=True)
    meter = _Progress(None, total=20, stream=tty)
    meter.update(20, 400)
    meter.close(True)
    assert "20/20" in tty.getvalue()


# ---- the command line ----------------------------------------------------------------------


def test_cli_several_inputs_and_exit_status_2(tmp_path, tokenizer, capsys):
    tool = load_tool("preprocess_data")
    model = str(tokenizer.model_path)
    inputs = [str(p) for p in _mixed_inputs(tmp_path)]
    status = tool.main(["--input", *inputs, "--tokenizer-model", model, "--output-prefix", str(tmp_path / "o"),
                        "--append-eod", "--workers", "2", "--progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert f"text: {len(DOCS)} documents" in captured.out
    assert _read_back(str(tmp_path / "o_text_document")) == [tokenizer.tokenize(t) + [tokenizer.eod] for t in DOCS]

    (tmp_path / "x.tsv").write_text("a\tb\n")
    for args, message in [
        (["--input", inputs[0], str(tmp_path / "x.tsv")], f"{tmp_path / 'x.tsv'}: unsupported file type"),
        (["--input", f"{tmp_path}/nothing*"], f"no files match {tmp_path}/nothing*"),
        (["--input", inputs[0], "--append-bos", "--workers", "0"], "workers must be >= 1, got 0"),
    ]:
        status = tool.main([*args, "--tokenizer-model", model, "--output-prefix", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert status == 2
        assert err.startswith(f"preprocess_data.py: error: {message}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:
        tool.main(["--input", inputs[0], "--tokenizer-model", model, "--output-prefix", "o",
                   "--tokenizer-type", "GPT2"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'GPT2'" in err
    assert not list(tmp_path.glob("bad*"))


def _hf_tokenizer_dir(root):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=specials))
    directory = root / "hf_tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory, tok


def test_cli_hugging_face_tokenizer_with_bos_and_eod(tmp_path, capsys):
    directory, tok = _hf_tokenizer_dir(tmp_path)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    data = _jsonl(tmp_path)
    expected = [[bos] + tok.encode(t, add_special_tokens=False).ids + [eos] for t in DOCS]
    tool = load_tool("preprocess_data")
    for model, extra in [(directory, ["--tokenizer-type", "HuggingFaceTokenizer"]),
                         (directory / "tokenizer.json", [])]:
        prefix = tmp_path / f"hf{len(extra)}"
        status = tool.main(["--input", str(data), "--tokenizer-model", str(model), *extra,
                            "--output-prefix", str(prefix), "--append-bos", "--append-eod"])
        captured = capsys.readouterr()
        assert status == 0, captured.err
        assert _read_back(f"{prefix}_text_document") == expected
    status = tool.main(["--input", str(data), "--tokenizer-model", str(directory), "--tokenizer-type",
                        "SentencePieceTokenizer", "--output-prefix", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("preprocess_data.py: error: tokenizer_type=SentencePieceTokenizer is invalid")


# ---- tiny datasets and the train/valid/test split ------------------------------------------


@pytest.fixture(scope="module")
def tiny_prefix(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    for i, text in enumerate(DOCS[:5]):
        (root / f"{i}.txt").write_text(text * 3, encoding="utf-8")
    return preprocess_jsonl(root, tokenizer.model_path, root / "tiny").prefixes["text"]


def test_tiny_dataset_split_errors_say_which_split_to_pass(tiny_prefix, tokenizer):
    from megaseg.data.datasets import build_train_valid_datasets

    with pytest.raises(ValueError) as info:  # pretraining's defaults: split 98,2,0 with eval samples
        build_train_valid_datasets(tiny_prefix, tokenizer, 16, [8, 4, 0], split="98,2,0")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"{tiny_prefix} has 5 documents: split='98,2,0' leaves the valid split with none, but 4 valid samples are "
        "requested; pass --split 4,1,0 (at least one document per split) or --split 100,0,0 with --eval-iters 0 "
        "(no validation)"
    )
    train, valid, test = build_train_valid_datasets(tiny_prefix, tokenizer, 16, [8, 4, 0], split="4,1,0")
    assert len(train) >= 8 and len(valid) >= 4 and test is None
    train, valid, _ = build_train_valid_datasets(tiny_prefix, tokenizer, 16, [8, 0, 0], split="100,0,0")
    assert len(train) >= 8 and valid is None


def test_tiny_dataset_without_validation_samples_keeps_the_default_split(tiny_prefix, tokenizer):
    from megaseg.data.datasets import build_train_valid_datasets

    # no samples asked from the empty valid split: it is not built, rather than refused or looped on
    train, valid, test = build_train_valid_datasets(tiny_prefix, tokenizer, 16, [8, 0, 0], split="98,2,0")
    assert len(train) >= 8 and valid is None and test is None
    with pytest.raises(ValueError, match=r"has 5 documents: split='1,9,0' leaves the train split with none, but "
                                         r"8 train samples are requested; pass --split 4,1,0"):
        build_train_valid_datasets(tiny_prefix, tokenizer, 16, [8, 1, 0], split="1,9,0")
