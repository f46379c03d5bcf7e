"""Training and loading sentencepiece tokenizers, in-process and through tools/train_tokenizer.py."""

import pytest

from megaseg.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceTokenizer,
    TokenizerError,
    train_tokenizer,
    validate_tokenizer,
)

from .conftest import ASCII_DOCS, run_tool


def test_trained_model_has_fixed_special_ids_and_byte_fallback(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.pad, tokenizer.unk, tokenizer.bos, tokenizer.eos) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert tokenizer.eod == tokenizer.eos != tokenizer.pad
    assert tokenizer.has_byte_fallback
    assert tokenizer.model_path.with_suffix(".vocab").read_text(encoding="utf-8").count("\n") == 512
    assert len(tokenizer.vocab) == 512 and tokenizer.inv_vocab[EOS_ID] == "</s>"


@pytest.mark.parametrize("text", ASCII_DOCS)
def test_detokenize_inverts_tokenize_for_ascii_text(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert UNK_ID not in ids
    assert tokenizer.detokenize(ids) == text


def test_unseen_characters_round_trip_through_byte_pieces(tokenizer):
    text = "naïve café ✓ 😀 \u2028"
    ids = tokenizer.tokenize(text)
    assert UNK_ID not in ids
    assert tokenizer.detokenize(ids) == text


def test_long_source_document_compresses_and_round_trips(tokenizer, small_corpus):
    text = small_corpus[0]
    ids = tokenizer.tokenize(text)
    assert len(ids) < len(text) / 1.5
    assert tokenizer.detokenize(ids) == text


def test_training_is_deterministic(tmp_path):
    lines = [line for doc in ASCII_DOCS * 20 for line in doc.splitlines() if line.strip()]
    a = train_tokenizer(lines, tmp_path / "a", vocab_size=400)
    b = train_tokenizer(lines, tmp_path / "b", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()


def test_impossible_requests_are_refused_with_reasons(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)
    with pytest.raises(TokenizerError, match="no training text"):
        train_tokenizer([], tmp_path / "t", vocab_size=300)
    with pytest.raises(TokenizerError, match="sentencepiece training failed: .*[Vv]ocabulary size"):
        train_tokenizer(["tiny corpus"], tmp_path / "t", vocab_size=5000)


def test_loading_a_missing_or_bogus_model_names_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer model not found: .*nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    with pytest.raises(TokenizerError, match="bogus.model is not a sentencepiece model"):
        validate_tokenizer(bogus)


def test_cli_trains_from_a_directory_glob_and_validates(tmp_path, small_corpus):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, text in enumerate(small_corpus[:3]):
        (corpus / "sub" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    trained = run_tool(
        "train_tokenizer", "--input", str(corpus / "**" / "*.txt"),
        "--output-prefix", str(tmp_path / "out" / "tok"), "--vocab-size", "400",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "trained on 3 file(s)" in trained.stdout and "vocab_size=400" in trained.stdout
    assert (tmp_path / "out" / "tok.model").is_file() and (tmp_path / "out" / "tok.vocab").is_file()

    checked = run_tool("train_tokenizer", "--validate", str(tmp_path / "out" / "tok.model"))
    assert checked.returncode == 0, checked.stderr
    assert "vocab_size=400 pad=0 unk=1 bos=2 eos=3 byte_fallback=True" in checked.stdout


def test_cli_errors_are_one_line_messages(tmp_path):
    missing = run_tool("train_tokenizer", "--input", str(tmp_path / "none*.txt"), "--output-prefix", str(tmp_path / "t"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"train_tokenizer.py: error: no input files match {tmp_path / 'none*.txt'}"

    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"\x00\x01garbage")
    invalid = run_tool("train_tokenizer", "--validate", str(bogus))
    assert invalid.returncode == 1
    assert len(invalid.stderr.strip().splitlines()) == 1
    assert "is not a sentencepiece model" in invalid.stderr and "Traceback" not in invalid.stderr
