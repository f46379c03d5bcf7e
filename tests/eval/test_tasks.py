"""Task generators: deterministic, exact length, gold scores 1, shuffled answers near chance."""
import random

import pytest

from megaseg.config import ConfigError
from megaseg.eval.loading import ByteTokenizer
from megaseg.eval.tasks import TASKS, Haystack, generate, generate_many, score


class WordTokenizer:
    """A toy word-level tokenizer (no BOS): the generators must work with any tokenizer."""

    bos_id = None

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_bos=True):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.replace("\n", " \n ").split(" ")]


@pytest.fixture(scope="module")
def byte_hay():
    return Haystack.from_source(ByteTokenizer(), max_bytes=400_000)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_exact_length_and_gold_scores_one(task, byte_hay):
    tok = ByteTokenizer()
    a = generate(task, 700, 3, tok, byte_hay)
    b = generate(task, 700, 3, tok, Haystack.from_source(tok, max_bytes=400_000))
    assert a.ids == b.ids and a.references == b.references
    assert len(a.ids) == 700 and a.input_ids[0] == tok.bos_id
    assert generate(task, 700, 4, tok, byte_hay).ids != a.ids
    assert tok.decode(a.answer_ids) == a.answer
    assert score(a.answer, a.references) == 1.0
    # The answer is recoverable from the prompt: every reference occurs in it.
    prompt = tok.decode(a.input_ids)
    assert all(r in prompt for r in a.references)


@pytest.mark.parametrize("task", TASKS)
def test_shuffled_answers_score_near_chance(task, byte_hay):
    samples = generate_many(task, 600, 12, ByteTokenizer(), byte_hay, seed=1)
    gold = [score(s.answer, s.references) for s in samples]
    assert gold == [1.0] * len(samples)
    answers = [s.answer for s in samples]
    random.Random(0).shuffle(answers)
    answers = answers[1:] + answers[:1]  # a derangement of a shuffle: nobody keeps their own
    shuffled = sum(score(a, s.references) for a, s in zip(answers, samples)) / len(samples)
    assert shuffled < 0.15


def test_any_tokenizer_and_any_length(byte_hay):
    tok = WordTokenizer()
    hay = Haystack([t + "\n" for t in byte_hay.lines[:5000]], tok)
    for task in TASKS:
        for length in (300, 1000):
            s = generate(task, length, 0, tok, hay)
            assert len(s.ids) == length


def test_answer_follows_needle_order_and_haystack_is_real_text(byte_hay):
    s = generate("niah_multivalue", 800, 2, ByteTokenizer(), byte_hay)
    text = ByteTokenizer().decode(s.input_ids)
    assert [text.index(v) for v in s.references] == sorted(text.index(v) for v in s.references)
    assert "def " in ByteTokenizer().decode(generate("passkey", 3000, 0, ByteTokenizer(), byte_hay).input_ids)


def test_bad_input_is_one_line_config_error(tmp_path, byte_hay):
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match="task='nope' is invalid"):
        generate("nope", 500, 0, tok, byte_hay)
    with pytest.raises(ConfigError, match="needs at least"):
        generate("niah_multikey", 50, 0, tok, byte_hay)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n   \n")
    with pytest.raises(ConfigError, match="is empty"):
        Haystack.from_source(tok, tmp_path / "empty")
    (tmp_path / "small.txt").write_text("only a few words here\nand another line\n")
    with pytest.raises(ConfigError, match="too small"):
        generate("passkey", 2000, 0, tok, Haystack.from_source(tok, tmp_path / "small.txt"))
