"""The inference engine keeps the consistency invariant (docs/semantics.md §6) for batches."""
import pytest
import torch

from megaseg.inference import InferenceEngine, SamplingConfig

from .tiny import PLAN, random_ids, tiny_model

S, M, R = 8, 3, 5


def _training_logits(model, seq):
    with torch.no_grad():
        logits, _ = model(seq[None])
    return logits[0]


def test_prefill_logits_equal_training_forward_for_prompts_of_different_lengths():
    model = tiny_model(seed=1, S=S, M=M, R=R)
    seqs = random_ids([3, 8, 19, 26, 26], model.config.vocab_size, seed=1)
    logits, state = InferenceEngine(model).prefill(seqs, all_logits=True)
    last, _ = InferenceEngine(model).prefill(seqs)
    for i, seq in enumerate(seqs):
        ref = _training_logits(model, seq)
        assert (logits[i] - ref).abs().max().item() <= 1e-5
        assert (last[i] - ref[-1]).abs().max().item() <= 1e-5
    assert state.positions() == [3, 8, 19, 26, 26]
    assert len(state.groups) == 4  # the two prompts of 26 tokens share one group


def _decode_against_training(model, prompt_lens, steps, seed, after_step=None):
    """Prefill prompts of ``prompt_lens`` tokens, decode ``steps`` tokens of the same random
    sequences; (worst logit difference to the training forward, engine, state, sequences).
    ``after_step(step, state)`` runs after every decode step."""
    seqs = random_ids([n + steps for n in prompt_lens], model.config.vocab_size, seed=seed)
    refs = [_training_logits(model, s) for s in seqs]
    engine = InferenceEngine(model)
    logits, state = engine.prefill([s[:n] for s, n in zip(seqs, prompt_lens)])
    worst = 0.0
    for step in range(steps):
        for i, n in enumerate(prompt_lens):
            worst = max(worst, (logits[i] - refs[i][n - 1 + step]).abs().max().item())
        tokens = torch.stack([s[n + step] for s, n in zip(seqs, prompt_lens)])
        logits = engine.decode(tokens, state)
        if after_step is not None:
            after_step(step, state)
    return worst, engine, state, seqs


def test_decode_logits_equal_training_forward_across_segment_boundaries_batched():
    model = tiny_model(seed=2, S=S, M=M, R=R)
    prompt_lens = [1, 5, 8, 13, 2]
    steps = 4 * S + 3  # every row crosses at least four segment boundaries while decoding
    worst, _, state, _ = _decode_against_training(model, prompt_lens, steps, seed=2)
    assert worst <= 1e-5
    assert state.positions() == [n + steps for n in prompt_lens]


def test_state_of_non_retrieval_heads_stays_within_s_plus_m_whatever_the_context():
    model = tiny_model(seed=3, S=S, M=M, R=R)
    engine = InferenceEngine(model)
    seqs = random_ids([12 * S + 5, 3], model.config.vocab_size, seed=3)
    _, state = engine.prefill(seqs)
    sizes = []
    for _ in range(3 * S):
        engine.decode(torch.tensor([1, 2]), state)
        layers = state.layer_tokens()
        for row in layers:
            assert row["open"] < S and row["tail"] <= M and row["retrieved"] <= R
            assert row["open"] + row["tail"] <= S + M
        sizes.append(state.nbytes()["bounded"])
        # Only layer 1 has retrieval groups, so only it keeps a pool (of closed segments).
        longest = max(state.positions())
        assert layers[1]["pool"] == longest - longest % S
        assert layers[0]["pool"] == layers[2]["pool"] == 0
    # The bounded part of the state repeats with the segment period: it does not grow.
    assert max(sizes[-S:]) == max(sizes[S : 2 * S])


def test_greedy_generation_is_the_argmax_of_the_training_forward():
    model = tiny_model(seed=4, S=S, M=M, R=R)
    prompts = random_ids([4, 11, 17], model.config.vocab_size, seed=4)
    result = InferenceEngine(model).generate(prompts, max_new_tokens=2 * S + 3)
    for prompt, new in zip(prompts, result.tokens):
        full = torch.cat([prompt, torch.tensor(new)])
        ref = _training_logits(model, full[:-1]).argmax(-1)[len(prompt) - 1 :]
        assert ref.tolist() == new
    assert result.finish_reasons == ["length"] * 3
    assert result.stats.generated_tokens == 3 * (2 * S + 3)


def test_batched_generation_equals_one_prompt_at_a_time():
    model = tiny_model(seed=5, S=S, M=M, R=R)
    prompts = random_ids([9, 2, 16, 9], model.config.vocab_size, seed=5)
    engine = InferenceEngine(model)
    batched = engine.generate(prompts, max_new_tokens=20).tokens
    alone = [engine.generate([p], max_new_tokens=20).tokens[0] for p in prompts]
    assert batched == alone


def test_a_row_that_hits_a_stop_token_leaves_the_batch_and_the_others_go_on():
    model = tiny_model(seed=6, S=S, M=M, R=R)
    prompts = random_ids([6, 10, 3], model.config.vocab_size, seed=6)
    engine = InferenceEngine(model)
    free = engine.generate(prompts, max_new_tokens=15).tokens
    stop = free[0][4]
    assert stop not in free[1][:15] and stop not in free[2][:15], "pick another seed: stop token must be unique to row 0"
    streamed = []
    result = engine.generate(prompts, max_new_tokens=15, stop_tokens=[stop], on_token=lambda r, t: streamed.append((r, t)))
    first = free[0].index(stop)
    assert result.tokens[0] == free[0][: first + 1]
    assert result.finish_reasons == ["stop", "length", "length"]
    assert result.tokens[1] == free[1] and result.tokens[2] == free[2]
    assert [t for r, t in streamed if r == 1] == free[1]


def test_select_reorders_and_repeats_rows_of_the_state():
    model = tiny_model(seed=7, S=S, M=M, R=R)
    seqs = random_ids([14, 5, 9], model.config.vocab_size, seed=7)
    engine = InferenceEngine(model)
    _, state = engine.prefill(seqs)
    picked = state.select([2, 0, 0])
    assert picked.positions() == [9, 14, 14]
    logits = engine.decode(torch.tensor([3, 4, 5]), picked)
    for row, (src, tok) in enumerate(((2, 3), (0, 4), (0, 5))):
        ref = _training_logits(model, torch.cat([seqs[src], torch.tensor([tok])]))[-1]
        assert (logits[row] - ref).abs().max().item() <= 1e-5


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_model(seed=8, S=S, M=M, R=R)
    prompts = random_ids([5, 12], model.config.vocab_size, seed=8)
    engine = InferenceEngine(model)
    cfg = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, seed=11)
    a = engine.generate(prompts, 12, cfg).tokens
    b = engine.generate(prompts, 12, cfg).tokens
    assert a == b
    greedy = engine.generate(prompts, 12).tokens
    assert engine.generate(prompts, 12, SamplingConfig(temperature=2.0, top_k=1, seed=0)).tokens == greedy


@pytest.mark.parametrize("prompts, message", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2], [5, 97]], "prompt 1 has token ids outside"),
])
def test_bad_prompts_are_one_line_errors(prompts, message):
    engine = InferenceEngine(tiny_model(plan=PLAN))
    with pytest.raises(ValueError, match=message) as e:
        engine.generate(prompts, 3)
    assert "\n" not in str(e.value)


def test_rows_at_different_positions_decode_in_one_step_and_convert_back_exactly():
    model = tiny_model(seed=9, S=S, M=M, R=R)
    prompt_lens = [3, 8, 11, 1]
    steps = 2 * S + 5

    def check(step, state):
        assert state._rows is not None  # one batched state per layer while decoding
        if step % 7 == 3:
            # Reading the groups converts back; the bounded state stays within S + M.
            assert state.positions() == [n + step + 1 for n in prompt_lens]
            for row in state.layer_tokens():
                assert row["open"] < S and row["tail"] <= M

    worst, engine, state, seqs = _decode_against_training(model, prompt_lens, steps, seed=9, after_step=check)
    assert worst <= 1e-5
    # A row-mode state can be reordered and repeated like any other.
    sel = state.select([2, 0, 2])
    more = random_ids([1], model.config.vocab_size, seed=10)[0]
    logits = engine.decode(torch.stack([more[0]] * 3), sel)
    for out_row, i in enumerate((2, 0, 2)):
        full = torch.cat([seqs[i], more])
        assert (logits[out_row] - _training_logits(model, full)[-1]).abs().max().item() <= 1e-5


def test_decode_asks_the_operator_for_its_buffered_decode():
    """Decode reaches the operator's decode entry point explicitly (a `DecodeStep` per
    layer), whatever the grad mode: every layer's state carries its decode buffers."""
    model = tiny_model(seed=11, S=S, M=M, R=R)
    engine = InferenceEngine(model)
    seq = random_ids([S + 5], model.config.vocab_size, seed=11)[0]
    _, state = engine.prefill([seq[: S + 3]])
    with torch.enable_grad():
        logits = engine.decode(seq[S + 3 : S + 4], state)
    assert all(st.cache is not None for st in state.groups[0].states)
    assert (logits[0] - _training_logits(model, seq[: S + 4])[-1]).abs().max().item() <= 1e-5
