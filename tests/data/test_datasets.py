"""GPT datasets through megatron-core's BlendedMegatronDatasetBuilder, and the default data."""

import numpy as np
import pytest

from megaseg.data.corpus import write_jsonl
from megaseg.data.datasets import build_train_valid_datasets, parse_blend
from megaseg.data.default_data import DefaultDataSettings, prepare_default_data
from megaseg.data.preprocess import preprocess_jsonl

SEQ = 64


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tokenizer, small_corpus):
    """Two indexed datasets: the long stdlib documents, and the same text reversed."""
    root = tmp_path_factory.mktemp("indexed")
    prefixes = {}
    for name, docs in (("fwd", small_corpus), ("rev", [t[::-1] for t in small_corpus])):
        write_jsonl(docs, root / f"{name}.jsonl")
        prefixes[name] = preprocess_jsonl(root / f"{name}.jsonl", tokenizer.model_path, root / name).prefixes["text"]
    documents = {name: [tokenizer.tokenize(t) for t in docs] for name, docs in
                 (("fwd", small_corpus), ("rev", [t[::-1] for t in small_corpus]))}  # fmt: skip
    return prefixes, documents


def _is_stream_window(window, documents, eod):
    """True when `window` is documents' tokens joined by eod: every eod-free run lies in one document."""
    runs, run = [], []
    for token in window:
        if token == eod:
            runs.append(run)
            run = []
        else:
            run.append(token)
    runs.append(run)
    joined = [" ".join(map(str, doc)) for doc in documents]
    for i, run in enumerate(runs):
        needle = " ".join(map(str, run))
        inner = 0 < i < len(runs) - 1
        if inner and not any(needle == doc for doc in joined):
            return False
        if run and not any(needle in doc for doc in joined):
            return False
    return True


def test_samples_hold_seq_length_plus_one_tokens_from_the_document_stream(indexed, tokenizer):
    prefixes, documents = indexed
    train, valid, test = build_train_valid_datasets(
        prefixes["fwd"], tokenizer, seq_length=SEQ, num_samples=[50, 5, 5], split="3,1,1", seed=3
    )
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5
    for idx in range(50):
        sample = train[idx]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (SEQ,)
        assert tokens.dtype.is_floating_point is False
        assert (tokens[1:] == labels[:-1]).all()
        window = tokens.tolist() + [labels[-1].item()]
        assert len(window) == SEQ + 1
        assert _is_stream_window(window, documents["fwd"], tokenizer.eod), idx
        assert sample["loss_mask"].sum() == SEQ
    crossing = [i for i in range(len(train)) if (train[i]["tokens"] == tokenizer.eod).any()]
    assert 0 < len(crossing) < len(train) / 10, "documents are long: few samples span a boundary"
    for idx in crossing[:5]:
        window = train[idx]["tokens"].tolist() + [train[idx]["labels"][-1].item()]
        assert _is_stream_window(window, documents["fwd"], tokenizer.eod), idx


def test_same_seed_same_samples_other_seed_other_order(indexed, tokenizer):
    prefixes, _ = indexed
    build = lambda seed: build_train_valid_datasets(  # noqa: E731
        prefixes["fwd"], tokenizer, seq_length=SEQ, num_samples=[20, 2, 2], split="3,1,1", seed=seed
    ).train
    a, b, c = build(1), build(1), build(2)
    first = [a[i]["tokens"].tolist() for i in range(20)]
    assert first == [b[i]["tokens"].tolist() for i in range(20)]
    assert first != [c[i]["tokens"].tolist() for i in range(20)]


def test_blend_draws_from_each_dataset_by_weight(indexed, tokenizer):
    prefixes, documents = indexed
    train, _, _ = build_train_valid_datasets(
        f"1 {prefixes['fwd']} 3 {prefixes['rev']}", tokenizer, seq_length=SEQ, num_samples=[400, 10, 10], split="3,1,1"
    )
    share_rev = float(np.mean(train.dataset_index[:400] == 1))
    assert share_rev == pytest.approx(0.75, abs=0.02)
    for idx in range(0, 400, 37):
        sample = train[idx]
        window = sample["tokens"].tolist() + [sample["labels"][-1].item()]
        source = "rev" if train.dataset_index[idx] == 1 else "fwd"
        assert _is_stream_window(window, documents[source], tokenizer.eod)


def test_parse_blend_accepts_megatron_forms_and_rejects_bad_ones():
    assert parse_blend("a") == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend("30 a 70 b") == (["a", "b"], [30.0, 70.0])
    with pytest.raises(ValueError, match="alternates weight and prefix"):
        parse_blend("30 a 70")
    with pytest.raises(ValueError, match="bad blend weight"):
        parse_blend(["1", "a", "x", "b"])
    with pytest.raises(ValueError, match="positive sum"):
        parse_blend("0 a 0 b")


def test_missing_dataset_files_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="indexed dataset file not found: .*nothing.bin"):
        build_train_valid_datasets(str(tmp_path / "nothing"), tokenizer, SEQ, [1, 1, 1])


def test_a_split_without_documents_is_refused_not_looped_on(indexed, tokenizer):
    prefixes, _ = indexed
    # megatron-core splits whole documents: 5 documents at 90/5/5 give 4/1/0
    with pytest.raises(ValueError, match=r"has 5 documents: split='90,5,5' leaves the test split with none"):
        build_train_valid_datasets(prefixes["fwd"], tokenizer, SEQ, [10, 1, 1], split="90,5,5")
    train, valid, test = build_train_valid_datasets(prefixes["fwd"], tokenizer, SEQ, [10, 1, 0], split="90,10,0")
    assert len(train) >= 10 and len(valid) >= 1 and test is None


def test_default_data_is_built_once_with_long_documents(tmp_path):
    settings = DefaultDataSettings(vocab_size=1024, tokenizer_train_chars=200_000, max_bytes=400_000)
    logged = []
    data = prepare_default_data(tmp_path / "default", settings, workers=1, log=logged.append)
    assert data.documents >= 3 and data.tokens > 0
    stamp = (tmp_path / "default" / "stdlib_text_document.bin").stat().st_mtime_ns

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megaseg.data.tokenizer import SentencePieceTokenizer

    indexed = IndexedDataset(data.data_prefix)
    lengths = indexed.sequence_lengths.copy()  # the dataset closes its mmap when collected
    del indexed
    assert len(lengths) == data.documents and lengths.sum() == data.tokens
    assert lengths.min() > 4000, "every default document should span many segments"

    again = prepare_default_data(tmp_path / "default", settings, log=logged.append)
    assert again == data
    assert "already prepared" in logged[-1]
    assert (tmp_path / "default" / "stdlib_text_document.bin").stat().st_mtime_ns == stamp

    tokenizer = SentencePieceTokenizer(data.tokenizer_model)
    train, _, _ = build_train_valid_datasets(data.data_prefix, tokenizer, 512, [8, 1, 1], split="2,1,1")
    assert train[0]["tokens"].shape == (512,)


def _write_tokens(prefix, documents, dtype=np.int32):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.from_numpy(np.asarray(doc, dtype=dtype)), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _write_masks(prefix, documents, mask_of):
    return _write_tokens(prefix, [[mask_of(t) for t in doc] for doc in documents], np.uint8)


def test_a_loss_mask_dataset_keeps_the_loss_where_its_label_is_one(indexed, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, _ = indexed
    source = IndexedDataset(prefixes["fwd"])
    docs = [source[i].tolist() for i in range(len(source))]
    odd = _write_masks(tmp_path / "odd", docs, lambda t: t % 2)
    plain = build_train_valid_datasets(prefixes["fwd"], tokenizer, seq_length=SEQ, num_samples=[20, 0, 0],
                                       split="1,0,0", seed=3).train
    masked = build_train_valid_datasets(prefixes["fwd"], tokenizer, seq_length=SEQ, num_samples=[20, 0, 0],
                                        split="1,0,0", seed=3, loss_mask_data=odd).train
    assert len(masked) == len(plain)
    for i in range(20):
        want, got = plain[i], masked[i]
        assert (got["tokens"] == want["tokens"]).all() and (got["labels"] == want["labels"]).all()
        expected = (want["loss_mask"] > 0) & (want["labels"] % 2 == 1)  # the mask of a token is its parity
        kept = got["loss_mask"] > 0
        assert (kept == expected).all(), i
        assert 0 < int(kept.sum()) < SEQ


def test_a_loss_mask_of_other_documents_is_refused(indexed, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, _ = indexed
    source = IndexedDataset(prefixes["fwd"])
    short = _write_masks(tmp_path / "short", [source[i].tolist()[:-1] for i in range(len(source))], lambda t: 1)
    with pytest.raises(ValueError, match="does not have the documents"):
        build_train_valid_datasets(prefixes["fwd"], tokenizer, seq_length=SEQ, num_samples=[5, 0, 0], split="1,0,0",
                                   seed=3, loss_mask_data=short)


@pytest.mark.parametrize("own_cache", [False, True])
def test_a_rewritten_dataset_is_read_through_new_indices_not_the_cached_ones(tokenizer, tmp_path, capsys, own_cache):
    """megatron-core keys its cached sample indices by path and settings: a prefix rewritten with
    other documents must not be sampled through the indices of the old ones."""
    import os

    from megaseg.data.datasets import drop_stale_index_caches

    eod = tokenizer.eod
    prefix = str(tmp_path / "data")
    cache = str(tmp_path / "indices") if own_cache else None
    build = lambda: build_train_valid_datasets(prefix, tokenizer, seq_length=SEQ, num_samples=[30, 0, 0],  # noqa: E731
                                               split="1,0,0", seed=3, path_to_cache=cache).train
    _write_tokens(prefix, [[5] * 40 + [eod] for _ in range(100)])
    first = build()
    assert {t for i in range(30) for t in first[i]["tokens"].tolist()} == {5, eod}
    assert drop_stale_index_caches([prefix], cache) == []  # the indices are newer than the data: kept
    _write_tokens(prefix, [[7] * 90 + [eod] for _ in range(150)])  # more and longer documents: old indices fit
    later = os.stat(prefix + ".bin").st_mtime_ns + 10**10  # newer than the cache whatever the clock's grain
    for ext in (".bin", ".idx"):
        os.utime(prefix + ext, ns=(later, later))
    capsys.readouterr()
    second = build()
    assert "is older than its data: rebuilt" in capsys.readouterr().out
    assert {t for i in range(30) for t in second[i]["tokens"].tolist()} == {7, eod}
    assert len(first.document_index) == 100 and len(second.document_index) == 150  # indices of the new documents
