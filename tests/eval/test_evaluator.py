"""The evaluator's megaseg perplexity is the training loss; modes' state memory behaves."""
import math

import pytest
import torch

from megaseg.config import ConfigError, HeadPlan
from megaseg.eval.evaluator import perplexity, run_sequence, task_accuracy
from megaseg.eval.loading import ByteTokenizer
from megaseg.eval.modes import InferenceMode, installed
from megaseg.eval.tasks import Haystack
from megaseg.training.tbptt import tbptt_backward
from tests.helpers import tiny_model


def test_megaseg_perplexity_equals_training_loss():
    model = tiny_model(seed=3, S=8, M=3, R=5, vocab=96)  # a plan with local, retrieval and segment heads
    ids = torch.randint(0, 96, (2, 45), generator=torch.Generator().manual_seed(0))
    train = tbptt_backward(lambda x, st: model(x, st), ids, 8, 1)
    model.zero_grad()
    res = perplexity(model, InferenceMode("megaseg"), ids.tolist(), bucket=8)
    assert res.mean_nll == pytest.approx(train.loss, rel=1e-6, abs=1e-6)
    assert res.ppl == pytest.approx(math.exp(train.loss), rel=1e-5)
    # Buckets partition the predicted tokens: their log-perplexities average back to the whole.
    sizes = [min(8, 44 - 8 * b) for b in range(len(res.bucket_ppl))]
    pooled = sum(n * math.log(p) for n, p in zip(sizes, res.bucket_ppl)) / sum(sizes)
    assert pooled == pytest.approx(res.mean_nll, rel=1e-9)
    # Per-segment training losses are the buckets of width S.
    for b, seg_loss in enumerate(train.segment_losses[:-1]):
        assert math.log(res.bucket_ppl[b]) == pytest.approx(seg_loss, rel=1e-5)


def test_state_memory_full_grows_streaming_and_megaseg_bounded():
    model = tiny_model(seed=1, S=8, M=3, R=0, plan=HeadPlan.all_local(3, 2))
    ids = list(range(90))
    peaks = {}
    for mode in (InferenceMode("full", "full", chunk=8), InferenceMode("streaming", "streaming", sinks=2, window=6, chunk=8),
                 InferenceMode("megaseg")):
        with installed(model, mode):
            peaks[mode.name] = [run_sequence(model, ids[:n], 8).peak_state_bytes for n in (40, 80)]
    assert peaks["full"][1] == 2 * peaks["full"][0]
    assert peaks["streaming"][0] == peaks["streaming"][1] < peaks["full"][0]
    assert peaks["megaseg"][0] == peaks["megaseg"][1] < peaks["full"][0]


def test_installed_restores_cores_and_bad_modes_fail():
    model = tiny_model(seed=0)
    before = [layer.self_attn.core for layer in model.model.layers]
    with installed(model, InferenceMode("s", "streaming", window=4)):
        assert all(layer.self_attn.core is not c for layer, c in zip(model.model.layers, before))
    assert [layer.self_attn.core for layer in model.model.layers] == before
    with pytest.raises(ConfigError, match="head plan is 2 x 2"):
        with installed(model, InferenceMode("d", "duo", full_heads=HeadPlan.all_local(2, 2))):
            pass
    with pytest.raises(ConfigError, match="runs at most 32 tokens"):
        InferenceMode("f", "full", max_length=32).check_length(33)
    with pytest.raises(ConfigError, match="kind='nope'"):
        InferenceMode("x", "nope")


class Oracle(torch.nn.Module):
    """Knows the samples: its logits put the true next token first (tracks the position
    through the states it returns), so it is perfect on every task."""

    def __init__(self, model, samples, wrong_answers=False):
        super().__init__()
        self.config, self.model, self.inner = model.config, model.model, model
        self.samples = {tuple(s.ids[:32]): s for s in samples}
        self.wrong = wrong_answers

    def forward(self, ids_BL, states):
        L = ids_BL.shape[1]
        if states[0] is None:
            self.seq, self.pos = self.samples[tuple(ids_BL[0, :32].tolist())], 0
        logits, states = self.inner(ids_BL, states)  # the real model runs too (states, memory)
        nxt = self.seq.ids[self.pos + 1:self.pos + 1 + L] + [0]
        answer_start = len(self.seq.input_ids)
        out = torch.full_like(logits, -10.0)
        for i, t in enumerate(nxt[:L]):
            pos = self.pos + i + 1
            if self.wrong and pos >= answer_start:
                t = ord("x")
            out[0, i, t] = 10.0
        self.pos += L
        return out, states


@pytest.mark.parametrize("task", ["passkey", "niah_multivalue", "variable_tracking"])
def test_task_accuracy_scores_an_oracle_one_and_a_wrong_answer_zero(task):
    from megaseg.eval.tasks import generate_many

    tok = ByteTokenizer()
    hay = Haystack.from_source(tok, max_bytes=200_000)
    model = tiny_model(seed=0, vocab=tok.vocab_size, plan=HeadPlan.all_local(3, 2), S=64, M=8, R=0)
    samples = generate_many(task, 300, 3, tok, hay)
    r = task_accuracy(Oracle(model, samples), InferenceMode("megaseg"), tok, task, 300, 3, hay)
    assert (r.accuracy, r.exact, r.samples) == (1.0, 1.0, 3)
    r = task_accuracy(Oracle(model, samples, wrong_answers=True), InferenceMode("megaseg"), tok, task, 300, 3, hay)
    assert (r.accuracy, r.exact) == (0.0, 0.0)
