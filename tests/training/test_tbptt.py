"""TBPTT-K gradients (docs/semantics.md §5) against a naive per-segment rebuild."""
import pytest
import torch

from megaseg.config import HeadPlan, LOCAL, RETRIEVAL, SEGMENT
from megaseg.training.tbptt import sum_cross_entropy, full_sequence_loss, segment_labels, tbptt_backward
from tests.helpers import tiny_model

S = 6


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def naive_tbptt_grads(model, ids, k):
    """For each segment i: rebuild the chain from a detached state at i-1-K, backprop l_i alone, sum."""
    model.zero_grad()
    labels = segment_labels(ids, None)
    denom = int((labels != -100).sum())
    n = -(-ids.shape[1] // S)
    for i in range(n):
        start = max(0, i - k)
        with torch.no_grad():
            states = None
            for j in range(start):
                _, states = model(ids[:, j * S : (j + 1) * S], states)
        states = [st.detached() for st in states] if states else None
        for j in range(start, i + 1):
            logits, states = model(ids[:, j * S : (j + 1) * S], states)
        (sum_cross_entropy(logits, labels[:, i * S : (i + 1) * S]) / denom).backward()
    return _grads(model)


def _model(seed=0):
    # Four layers with local heads in every layer so K = 0, 1, 2 give different gradients.
    plan = HeadPlan(((LOCAL, RETRIEVAL), (LOCAL, SEGMENT), (RETRIEVAL, LOCAL), (LOCAL, LOCAL)))
    return tiny_model(seed=seed, num_layers=4, num_heads=4, num_kv_heads=2, S=S, M=2, R=4, plan=plan)


def _rel_err(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_tbptt_gradients_equal_naive_reference(k):
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 5 * S + 4), generator=torch.Generator().manual_seed(k))
    ref = naive_tbptt_grads(model, ids, k)
    model.zero_grad()
    tbptt_backward(model, ids, S, k)
    assert _rel_err(_grads(model), ref) <= 1e-5


def test_gradients_differ_across_k_but_forward_does_not():
    model = _model(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 5 * S), generator=torch.Generator().manual_seed(3))
    grads, losses = {}, {}
    for k in (0, 1, 2, 8):
        model.zero_grad()
        res = tbptt_backward(model, ids, S, k)
        grads[k], losses[k] = _grads(model), res.loss
    with torch.no_grad():
        full = full_sequence_loss(model, ids).item()
    for k in (1, 2, 8):
        assert abs(losses[k] - losses[0]) <= 1e-6 * abs(losses[0])
    assert abs(losses[0] - full) <= 1e-5 * abs(full)
    assert _rel_err(grads[0], grads[1]) > 1e-3 and _rel_err(grads[1], grads[2]) > 1e-4
    # K at least the chain length equals full backpropagation through the one-pass forward.
    model.zero_grad()
    full_sequence_loss(model, ids).backward()
    assert _rel_err(grads[8], _grads(model)) <= 1e-5


@pytest.mark.parametrize("k, crosses", [(0, False), (1, True)])
def test_k0_stops_every_gradient_at_the_segment_boundary(k, crosses):
    """Only segment 1 is labelled; segment 0 uses its own token ids. With K = 0 no gradient
    reaches segment 0's embeddings; with K = 1 it does (through the tails)."""
    model = _model(seed=2)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, V // 2, (1, S), generator=g), torch.randint(V // 2, V, (1, S), generator=g)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, S:-1] = ids[:, S + 1 :]
    model.zero_grad()
    tbptt_backward(model, ids, S, k, labels_BT=labels)
    seg0_rows = model.model.embed_tokens.weight.grad[: V // 2]
    assert (seg0_rows.abs().max().item() > 0) == crosses


def test_step_reports_per_segment_losses_and_mean():
    model = _model(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * S + 2), generator=torch.Generator().manual_seed(1))
    res = tbptt_backward(model, ids, S, 1)
    assert len(res.segment_losses) == 4 and res.segment_tokens == [2 * S, 2 * S, 2 * S, 2 * 1]
    mean = sum(l * n for l, n in zip(res.segment_losses, res.segment_tokens)) / sum(res.segment_tokens)
    assert abs(mean - res.loss) <= 1e-6 * res.loss


def test_negative_k_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="tbptt_k=-1"):
        tbptt_backward(model, torch.zeros(1, 4, dtype=torch.long), S, -1)
