"""Recall training data: megaseg.data.recall (and its recall_* modules) and
tools/make_recall_data.py, read back through megatron-core's IndexedDataset and checked
against the needle sidecar."""

import json
from dataclasses import replace

import pytest

from megaseg.data.recall import (
    HAYSTACK,
    RECALL_TASKS,
    RecallError,
    RecallSettings,
    write_recall_dataset,
)
from megaseg.data.recall_pieces import mqar_vocabulary
from megaseg.data.recall_settings import value_split
from megaseg.data.tokenizer import load_tokenizer
from megaseg.eval.tasks import PASSKEY_QUERY

from .conftest import run_tool

CORPUS_BYTES = 1_000_000
BASE = RecallSettings(
    tasks=RECALL_TASKS, documents=48, lengths=(512,), segment_length=64, min_gap_segments=2, max_gap_segments=4,
    haystack_fraction=0.2, seed=7, mqar_pairs=8, mqar_queries=4, corpus_bytes=CORPUS_BYTES,
)


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(f"{prefix}_text_document")
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    with open(f"{prefix}_needles.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return docs, records


def _build(tmp_path, tokenizer_model, name="recall", **changes):
    settings = replace(BASE, **changes)
    result = write_recall_dataset(tokenizer_model, tmp_path / name, settings)
    docs, records = _read(tmp_path / name)
    return settings, result, docs, records


def _hf_tokenizer(directory, texts, vocab_size):
    """A byte-level BPE tokenizer.json (GPT-2 style) trained on ``texts``, with eos only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(scope="module")
def sp_data(tmp_path_factory, tokenizer):
    return _build(tmp_path_factory.mktemp("recall_sp"), tokenizer.model_path)


def _check_dataset(tok, settings, docs, records):
    """Every property the sidecar promises, checked against the stored ids."""
    assert len(docs) == len(records) == settings.documents
    S = settings.segment_length
    for index, (ids, rec) in enumerate(zip(docs, records)):
        assert rec["doc"] == index and rec["split"] == settings.split
        assert rec["length"] in settings.lengths
        assert len(ids) == rec["length"], rec
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        if settings.append_bos:
            assert ids[0] == tok.bos
        if rec["task"] == HAYSTACK:
            assert rec["needles"] == [] and rec["gap_segments"] is None
            continue
        assert rec["task"] in settings.tasks
        # every span decodes to its recorded text, and every field's ids are its text's ids
        spans = list(rec["needles"]) + [rec["question"]] + ([rec["answer"]] if rec["answer"] else [])
        for span in spans:
            assert tok.detokenize(ids[span["start"]:span["end"]]) == span["text"], (rec["task"], span)
            for f in span.get("fields", []):
                assert span["start"] <= f["start"] < f["end"] <= span["end"]
                assert ids[f["start"]:f["end"]] == tok.tokenize(f["text"]), (rec["task"], f)
        for answer in rec["answers"]:
            assert ids[answer["start"]:answer["end"]] == tok.tokenize(answer["text"])
        assert rec["references"] == [a["text"].strip() for a in rec["answers"]] and rec["references"]
        # question at the end, answer right after it, then eod (aligned: haystack text before eod)
        question = rec["question"]
        last = rec["answer"]["end"] if rec["answer"] else question["end"]
        assert last == rec["length"] - 1 or (settings.align_answer and last < rec["length"] - 1)
        if rec["answer"]:
            assert rec["answer"]["start"] == question["end"]
            assert all(rec["answer"]["start"] <= a["start"] < a["end"] <= rec["answer"]["end"] for a in rec["answers"])
        # needles do not overlap and come before the question
        spans_sorted = sorted((n["start"], n["end"]) for n in rec["needles"])
        assert all(a[1] <= b[0] for a, b in zip(spans_sorted, spans_sorted[1:]))
        assert spans_sorted[-1][1] <= question["start"]
        # the gap, recomputed from offsets
        targets = [n for n in rec["needles"] if n["role"] == "target"]
        anchor_end = max(n["end"] for n in targets) - 1
        gap = question["start"] // S - anchor_end // S
        assert gap == rec["gap_segments"] and settings.min_gap_segments <= gap <= settings.max_gap_segments, rec
        assert rec["distance"] == question["start"] - anchor_end
        assert all(n["gap_segments"] >= gap for n in targets)
        # the recall structure itself
        fields = [f for n in targets for f in n["fields"]]
        if rec["task"] in ("passkey", "niah_single", "niah_multikey", "niah_multivalue"):
            planted = [f["text"].strip() for f in fields if f["name"] == "value"]
            if rec["task"] == "passkey":
                assert planted == rec["references"] * 2
                assert question["text"] == PASSKEY_QUERY
            else:
                assert planted == rec["references"]
                asked = {f["text"].strip() for f in question["fields"] if f["name"] == "key"}
                assert asked == {f["text"].strip() for f in fields if f["name"] == "key"}
        elif rec["task"] == "variable_tracking":
            names = [f["text"].strip() for f in fields if f["name"] == "name"]
            assert names == rec["references"]
            first_value = next(f["text"].strip() for f in fields if f["name"] == "value")
            assert [f["text"].strip() for f in question["fields"]] == [first_value]
        elif rec["task"] == "mqar":
            pairs = {}
            for key, value in zip(fields[0::2], fields[1::2]):
                assert key["name"] == "key" and value["name"] == "value"
                assert key["end"] - key["start"] == 1 and value["end"] - value["start"] == 1
                pairs[ids[key["start"]]] = ids[value["start"]]
            assert len(pairs) == settings.mqar_pairs  # distinct keys
            queries = question["fields"]
            assert len(queries) == 2 * settings.mqar_queries
            asked = [ids[q["start"]] for q in queries if q["name"] == "key"]
            assert len(set(asked)) == settings.mqar_queries
            for q in queries[0::2]:
                assert ids[q["start"] + 1] == pairs[ids[q["start"]]]  # the value right after the query
            assert [ids[a["start"]] for a in rec["answers"]] == [pairs[k] for k in asked]
        # only values of this split
        assert rec["values"] and all(value_split(v, settings.eval_fraction) == settings.split for v in rec["values"])
        for value in rec["references"] if rec["task"] != "variable_tracking" else ():
            assert value in rec["values"]


def test_documents_and_sidecar_agree_with_sentencepiece(sp_data, tokenizer):
    settings, result, docs, records = sp_data
    _check_dataset(tokenizer, settings, docs, records)
    counts = {}
    for rec in records:
        counts[rec["task"]] = counts.get(rec["task"], 0) + 1
    assert result.tasks == counts and set(counts) == set(RECALL_TASKS) | {HAYSTACK}
    assert result.documents == len(docs) and result.tokens == sum(map(len, docs)) == 48 * 512
    gaps = {rec["gap_segments"] for rec in records if rec["task"] != HAYSTACK}
    assert gaps == {2, 3, 4}  # every allowed gap occurs
    # needles and questions are the eval templates' own token ids (encoding in parts changes nothing)
    for ids, rec in zip(docs, records):
        if rec["task"] not in (HAYSTACK, "mqar", "copy"):  # token lists, not templates
            for span in rec["needles"] + [rec["question"], rec["answer"]]:
                assert ids[span["start"]:span["end"]] == tokenizer.tokenize(span["text"]), span


def test_mixed_lengths_bos_and_narrow_gap(tmp_path, tokenizer):
    settings, _, docs, records = _build(
        tmp_path, tokenizer.model_path, tasks=("passkey", "niah_multikey", "variable_tracking"), documents=24,
        lengths=(300, 640), segment_length=100, min_gap_segments=1, max_gap_segments=1, haystack_fraction=0.0,
        append_bos=True)
    _check_dataset(tokenizer, settings, docs, records)
    assert {len(d) for d in docs} == {300, 640}
    assert all(rec["gap_segments"] == 1 for rec in records)


def test_train_and_eval_splits_use_disjoint_values(tmp_path, tokenizer, sp_data):
    _, _, _, train = sp_data
    settings, _, docs, held = _build(tmp_path, tokenizer.model_path, split="eval", documents=30,
                                     haystack_fraction=0.0)
    _check_dataset(tokenizer, settings, docs, held)
    train_values = {v for rec in train for v in rec["values"]}
    eval_values = {v for rec in held for v in rec["values"]}
    assert train_values and eval_values and not train_values & eval_values
    assert all(value_split(v, 0.1) == "train" for v in train_values)
    assert all(value_split(v, 0.1) == "eval" for v in eval_values)
    # MQAR values of the eval set are eval-part single tokens of the tokenizer
    _, values = mqar_vocabulary(tokenizer)
    eval_tokens = {t for t, v in values if value_split(v, 0.1) == "eval"}
    mqar = [rec for rec in held if rec["task"] == "mqar"]
    assert mqar and all(docs[r["doc"]][a["start"]] in eval_tokens for r in mqar for a in r["answers"])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tokenizer, sp_data):
    first = tmp_path / "first"
    small = dict(documents=12)
    _build(first, tokenizer.model_path, **small)
    _build(tmp_path / "again", tokenizer.model_path, **small)
    _build(tmp_path / "other", tokenizer.model_path, seed=8, **small)
    for suffix in ("_text_document.bin", "_text_document.idx", "_needles.jsonl"):
        mine = (first / f"recall{suffix}").read_bytes()
        assert mine == (tmp_path / "again" / f"recall{suffix}").read_bytes(), suffix
        if suffix != "_text_document.idx":  # same lengths: same index
            assert mine != (tmp_path / "other" / f"recall{suffix}").read_bytes(), suffix
    # the first 12 documents of the 48-document module dataset are these same 12
    _, _, docs48, recs48 = sp_data
    docs12, recs12 = _read(first / "recall")
    assert docs12 == docs48[:12] and recs12 == recs48[:12]


def test_bad_requests_raise_one_line_errors(tmp_path, tokenizer):
    model = tokenizer.model_path
    cases = [
        (dict(lengths=(40,), segment_length=16, min_gap_segments=0, max_gap_segments=1),
         r"length=40 is too short for task 'passkey': its needles, question and answer need \d+ tokens"),
        (dict(min_gap_segments=8, max_gap_segments=9),
         r"min_gap_segments=8 is larger than the document allows: length=512 with segment_length=64 has at most 7"),
        (dict(max_gap_segments=9), r"max_gap_segments=9 is larger than the document allows"),
        (dict(lengths=(512,), segment_length=64, min_gap_segments=7, max_gap_segments=7, tasks=("variable_tracking",)),
         r"gap_segments=7..7 does not fit task 'variable_tracking' at length=512"),
        (dict(tasks=("passkey", "cwe")), r"task='cwe' is invalid: recall tasks are passkey, niah_single"),
        (dict(tasks=("mqar",), mqar_pairs=500, mqar_queries=4), r"mqar_pairs=500 is invalid for .*: it has only \d+"),
        (dict(mqar_queries=9), r"mqar_queries=9 is invalid: at most mqar_pairs=8"),
        (dict(split="eval", eval_fraction=0.0), r"eval_fraction=0.0 is invalid with split=eval"),
        (dict(split="test"), r"split='test' is invalid"),
        (dict(haystack_fraction=1.5), r"haystack_fraction=1.5 is invalid"),
    ]
    for changes, message in cases:
        with pytest.raises(RecallError, match=message) as info:
            write_recall_dataset(model, tmp_path / "bad", replace(BASE, **changes))
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value), changes
    assert list(tmp_path.iterdir()) == []


def test_hugging_face_tokenizer_and_no_single_token_values(tmp_path, small_corpus):
    texts = [line for text in small_corpus for line in text.splitlines() if line.strip()]
    hf_dir = _hf_tokenizer(tmp_path / "hf", texts, vocab_size=700)
    tok = load_tokenizer(hf_dir)
    settings, result, docs, records = _build(tmp_path, hf_dir, documents=30, haystack_fraction=0.1)
    _check_dataset(tok, settings, docs, records)
    assert {rec["task"] for rec in records} >= {"passkey", "mqar", "variable_tracking"}
    keys, values = mqar_vocabulary(tok)
    assert keys and values and all(tok.tokenize(text) == [tid] for tid, text in keys + values)
    # it has no bos: --append-bos cannot work
    with pytest.raises(RecallError, match=r"append_bos=True is invalid: .* has no bos token"):
        write_recall_dataset(hf_dir, tmp_path / "bos", replace(BASE, append_bos=True))
    # a byte-level tokenizer without merges has no single-token words or numbers
    bytes_dir = _hf_tokenizer(tmp_path / "bytes", texts, vocab_size=257)
    with pytest.raises(RecallError, match=r"has no single-token values for MQAR"):
        write_recall_dataset(bytes_dir, tmp_path / "nomqar", replace(BASE, tasks=("mqar",)))
    assert not list(tmp_path.glob("nomqar*")) and not list(tmp_path.glob("bos*"))


def test_cli_writes_dataset_and_reports_progress(tmp_path, tokenizer):
    prefix = tmp_path / "out" / "recall"
    ran = run_tool(
        "make_recall_data", "--tokenizer-model", str(tokenizer.model_path), "--output-prefix", str(prefix),
        "--tasks", "passkey,mqar,variable_tracking", "--documents", "20", "--length", "384", "--segment-length", "64",
        "--min-gap-segments", "1", "--max-gap-segments", "3", "--haystack-fraction", "0.5", "--seed", "1234",
        "--mqar-pairs", "6", "--mqar-queries", "3", "--corpus-bytes", str(CORPUS_BYTES), "--log-interval", "8",
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.strip().splitlines()
    assert lines[0].startswith("8/20 documents, ") and lines[0].endswith(" docs/s")
    assert lines[1].startswith("16/20 documents, ")
    assert lines[2].startswith("wrote 20 documents, 7680 tokens (") and lines[2].endswith(" docs/s)")
    assert f"{prefix}_text_document.bin/.idx, {prefix}_needles.jsonl" in lines[2]
    settings = replace(BASE, tasks=("passkey", "mqar", "variable_tracking"), documents=20, lengths=(384,),
                       segment_length=64, min_gap_segments=1, max_gap_segments=3, haystack_fraction=0.5, seed=1234,
                       mqar_pairs=6, mqar_queries=3)
    docs, records = _read(prefix)
    _check_dataset(tokenizer, settings, docs, records)
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "recall_needles.jsonl", "recall_text_document.bin", "recall_text_document.idx"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tokenizer):
    model = str(tokenizer.model_path)
    out = str(tmp_path / "o")
    cases = {
        "unknown task": (["--tasks", "passkey,bogus"], "task='bogus' is invalid: recall tasks are "),
        "too short": (["--length", "30", "--segment-length", "8", "--min-gap-segments", "0", "--max-gap-segments", "2"],
                      "length=30 is too short for task 'passkey'"),
        "gap too large": (["--length", "256", "--segment-length", "128", "--min-gap-segments", "2"],
                          "min_gap_segments=2 is larger than the document allows"),
        "bad lengths": (["--lengths", "256,x"], "argument --lengths: '256,x' is not a comma-separated list"),
        "both lengths": (["--length", "256", "--lengths", "256"],
                         "argument --lengths: not allowed with argument --length"),
        "missing tokenizer": (["--tokenizer-model", str(tmp_path / "none.model")], "tokenizer not found: "),
    }
    for case, (args, message) in cases.items():
        base = ["--tokenizer-model", model] if "--tokenizer-model" not in args else []
        ran = run_tool("make_recall_data", *base, "--output-prefix", out, "--corpus-bytes", str(CORPUS_BYTES), *args)
        assert ran.returncode == 2, (case, ran.stderr)
        assert ran.stderr.startswith(f"make_recall_data.py: error: {message}"), (case, ran.stderr)
        assert len(ran.stderr.strip().splitlines()) == 1, (case, ran.stderr)
        assert ran.stdout == "", case
    assert list(tmp_path.iterdir()) == []


def test_copy_documents_repeat_their_span(tmp_path, tokenizer):
    settings, _, docs, records = _build(tmp_path, tokenizer.model_path, tasks=("copy",), documents=12, copy_length=20,
                                        haystack_fraction=0.0)
    _check_dataset(tokenizer, settings, docs, records)
    for ids, rec in zip(docs, records):
        (span,) = rec["needles"]
        question = rec["question"]
        assert span["end"] - span["start"] == question["end"] - question["start"] == 20
        assert ids[span["start"]:span["end"]] == ids[question["start"]:question["end"]]
        assert [a["start"] for a in rec["answers"]] == list(range(question["start"] + 1, question["end"]))


@pytest.mark.parametrize("digits", [0, 3])
def test_aligned_answers_start_a_segment_and_the_loss_mask_marks_them(tmp_path, tokenizer, digits):
    """align_answer: the token that predicts every answer (the question's last) starts a
    segment, so the question's second-to-last token ends the segment before and its query
    selects the retrieved prefix the prediction reads; the loss mask is 1 exactly at the
    answer tokens; value_digits sets the values (0: one token)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    settings = replace(BASE, tasks=("passkey", "niah_single", "variable_tracking"), documents=16, haystack_fraction=0.0,
                       align_answer=True, value_digits=digits)
    result = write_recall_dataset(tokenizer.model_path, tmp_path / "aligned", settings, loss_mask=True)
    docs, records = _read(tmp_path / "aligned")
    _check_dataset(tokenizer, settings, docs, records)
    masks = IndexedDataset(result.loss_mask_prefix)
    for i, (ids, rec) in enumerate(zip(docs, records)):
        assert rec["answer"]["start"] % settings.segment_length == 1
        assert rec["question"]["end"] == rec["answer"]["start"] and len(ids) == 512 and ids[-1] == tokenizer.eod
        marked = [j for j, m in enumerate(masks[i].tolist()) if m]
        assert marked == [j for a in rec["answers"] for j in range(a["start"], a["end"])]
        if rec["task"] == "passkey":
            (value,) = rec["references"]
            assert len(value) == digits and value.isdigit() if digits else len(rec["answers"][0]["text"]) > 0
            assert rec["answers"][0]["end"] - rec["answers"][0]["start"] == (1 if digits == 0 else len(
                tokenizer.tokenize(" " + value)))


def test_align_answer_needs_tasks_with_one_answer():
    with pytest.raises(RecallError, match="align_answer"):
        replace(BASE, tasks=("mqar",), align_answer=True).validate()
