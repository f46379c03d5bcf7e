"""The consistency invariant (docs/semantics.md §6): training forward = prefill = decode."""
import random

import pytest
import torch

from megaseg.config import RopeConfig
from tests.helpers import tiny_model


def _run_chunks(model, ids, chunks):
    states, outs, s = None, [], 0
    for n in chunks:
        logits, states = model(ids[:, s : s + n], states)
        outs.append(logits)
        s += n
    assert s == ids.shape[1]
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("seed", range(3))
def test_training_forward_equals_prefill_equals_decode(seed):
    rope = RopeConfig(theta=10000.0, scaling_type="llama3", factor=4.0, original_max_position_embeddings=16) if seed == 2 else None
    model = tiny_model(seed=seed, num_layers=3, num_heads=6, num_kv_heads=3, S=8, M=3, R=5, rope=rope)
    T = 8 * 4 + 5  # several boundaries and an uneven last segment
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        train, _ = model(ids)
        prefill, _ = _run_chunks(model, ids, [8] * 4 + [5])
        decode, _ = _run_chunks(model, ids, [1] * T)
        rng = random.Random(seed)
        cuts = []
        while sum(cuts) < T:
            cuts.append(min(rng.randint(1, 11), T - sum(cuts)))
        ragged, _ = _run_chunks(model, ids, cuts)
    for other in (prefill, decode, ragged):
        assert (other - train).abs().max().item() <= 1e-5


def test_prefill_then_decode_matches_training_forward_past_training_length():
    model = tiny_model(seed=4, S=4, M=2, R=3)
    T = 4 * 12 + 1
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train, _ = model(ids)
        mixed, states = _run_chunks(model, ids, [13] + [1] * (T - 13))
    assert (mixed - train).abs().max().item() <= 1e-5
    # Bounded state: open segment + tail are at most S + M tokens, only the pool grows.
    for st in states:
        open_len = 0 if st.open_k is None else st.open_k.shape[1]
        tail_len = 0 if st.tail_k is None else st.tail_k.shape[1]
        assert open_len + tail_len <= 4 + 2


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(seed=1, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
