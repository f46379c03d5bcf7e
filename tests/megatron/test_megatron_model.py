"""The megatron-core GPTModel with segmented attention is the reference model, in megatron."""
import pytest
import torch

from megaseg.config import ConfigError
from megaseg.megatron.attention import SegmentStates
from megaseg.megatron.convert import megatron_to_reference, reference_to_megatron
from megaseg.megatron.model import build_model, segment_forward, transformer_config_from
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.tbptt import tbptt_backward

pytestmark = pytest.mark.usefixtures("model_parallel")


def _pair(cfg, seed=0):
    """Reference model and a megatron model holding the same weights."""
    torch.manual_seed(seed)
    ref = SegmentedLlamaForCausalLM(cfg)
    meg = build_model(cfg, use_te=False)
    meg.load_state_dict(reference_to_megatron(ref.state_dict(), cfg, tp_rank=0, tp_size=1), strict=True)
    return ref, meg


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_reference_model(make_cfg, tokens, tied):
    cfg = make_cfg(tied)
    ref, meg = _pair(cfg)
    with torch.no_grad():
        ref_logits, _ = ref(tokens)
        meg_logits, states = segment_forward(meg, tokens, None)
    assert meg_logits.shape == (2, 21, cfg.vocab_size)
    assert (meg_logits - ref_logits).abs().max().item() <= 1e-5
    assert len(states) == cfg.num_layers and all(st.tokens == 21 for st in states)


def test_segment_by_segment_calls_match_one_pass(make_cfg, tokens):
    cfg = make_cfg()
    _, meg = _pair(cfg)
    with torch.no_grad():
        full, full_states = segment_forward(meg, tokens, None)
        for splits in ([8, 8, 5], [3, 9, 1, 1, 7]):  # per segment; prefill across boundaries + decode
            states, pieces, start = None, [], 0
            for n in splits:
                logits, states = segment_forward(meg, tokens[:, start : start + n], states)
                pieces.append(logits)
                start += n
            assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5, splits
            for a, b in zip(states, full_states):
                assert a.tokens == b.tokens
                ta, tb = a.tensors(), b.tensors()
                assert ta.keys() == tb.keys()
                for name in ta:
                    assert (ta[name] - tb[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tbptt_k1_gradients_match_reference_model(make_cfg, tokens, tied):
    cfg = make_cfg(tied)
    ref, meg = _pair(cfg, seed=1)
    S = cfg.segment.segment_length
    ref_step = tbptt_backward(lambda ids, st: ref(ids, st), tokens, S, k=1)
    meg_step = tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, S, k=1)
    assert abs(meg_step.loss - ref_step.loss) <= 1e-5
    grads = megatron_to_reference([{n: p.grad for n, p in meg.named_parameters()}], cfg)
    for name, p in ref.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (grads[name] - p.grad).abs().max().item() <= 1e-5 * scale, name


def test_tbptt_gradient_reaches_previous_segment_through_tails(make_cfg, tokens):
    """K = 1 and K = 0 differ only through the carried tails; the megatron model must carry them."""
    cfg = make_cfg()
    _, meg = _pair(cfg, seed=2)
    S = cfg.segment.segment_length
    grads = []
    for k in (0, 1):
        meg.zero_grad(set_to_none=True)
        tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, S, k=k)
        grads.append(meg.decoder.layers[0].self_attention.linear_qkv.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max().item() > 1e-6


def test_states_are_per_call_not_stored_on_the_model(make_cfg, tokens):
    """Two interleaved sequences through one model keep separate state."""
    cfg = make_cfg()
    _, meg = _pair(cfg)
    other = torch.flip(tokens, dims=[1])
    with torch.no_grad():
        want_a, _ = segment_forward(meg, tokens, None)
        want_b, _ = segment_forward(meg, other, None)
        sa = sb = None
        got_a, got_b = [], []
        for start in range(0, 21, 8):
            la, sa = segment_forward(meg, tokens[:, start : start + 8], sa)
            lb, sb = segment_forward(meg, other[:, start : start + 8], sb)
            got_a.append(la)
            got_b.append(lb)
    assert (torch.cat(got_a, 1) - want_a).abs().max().item() <= 1e-5
    assert (torch.cat(got_b, 1) - want_b).abs().max().item() <= 1e-5


def test_gpt_model_forward_without_states_is_one_pass_from_empty_state(make_cfg, tokens):
    cfg = make_cfg()
    ref, meg = _pair(cfg)
    with torch.no_grad():
        logits = meg(tokens, position_ids=None, attention_mask=None, runtime_gather_output=True)
        ref_logits, _ = ref(tokens)
    assert (logits[..., : cfg.vocab_size] - ref_logits).abs().max().item() <= 1e-5


def test_segment_states_carrier_returns_inputs_untouched(make_cfg, tokens):
    cfg = make_cfg()
    _, meg = _pair(cfg)
    with torch.no_grad():
        _, states = segment_forward(meg, tokens[:, :8], None)
        carrier = SegmentStates.start(list(range(cfg.num_layers)), states)
        meg(tokens[:, 8:], position_ids=None, attention_mask=None, packed_seq_params=carrier)
    assert all(carrier.inputs[i] is states[i] for i in range(cfg.num_layers))
    assert [st.tokens for st in carrier.next_states(range(cfg.num_layers))] == [21] * cfg.num_layers


def test_packed_thd_sequences_are_refused(make_cfg, tokens):
    from megatron.core.packed_seq_params import PackedSeqParams

    _, meg = _pair(make_cfg())
    with pytest.raises(ValueError, match="packed"):
        meg(tokens, position_ids=None, attention_mask=None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1,
             "distribute_saved_activations": True},
            "recompute_granularity",
        ),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"num_attention_heads": 4}, "num_attention_heads"),
    ],
)
def test_transformer_config_rejects_settings_that_break_segmented_semantics(make_cfg, overrides, field):
    with pytest.raises(ConfigError, match=field):
        transformer_config_from(make_cfg(), **overrides)


@pytest.mark.parametrize("overrides", [
    {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
])
def test_recompute_settings_are_allowed(make_cfg, overrides):
    config = transformer_config_from(make_cfg(), **overrides)
    assert config.recompute_granularity == overrides["recompute_granularity"]
