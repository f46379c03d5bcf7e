"""Inference over a stream of documents (docs/semantics.md §8): with ``document_eod`` the token
after an EOD starts from an empty state in prefill and in decode, so each document's logits
are those it has alone; without it the state crosses the EOD (the control)."""
import pytest
import torch

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.inference import InferenceEngine
from megaseg.models.llama import SegmentedLlamaForCausalLM

EOD = 7


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      segment=SegmentConfig(8, 3, 4, 1), head_plan=HeadPlan.interleaved(2, 2, [1], 1))
    torch.manual_seed(0)
    m = SegmentedLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def _doc(n, seed):
    t = torch.randint(8, 50, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([t, torch.tensor([EOD])])


A, B, C = _doc(13, 1), _doc(20, 2), _doc(9, 3)[:-1]  # C is still open (no EOD yet)


def test_prefill_of_a_stream_gives_each_document_its_own_logits(model):
    engine = InferenceEngine(model, document_eod=EOD)
    stream = torch.cat([A, B, C])
    (logits,), _ = engine.prefill([stream], all_logits=True)
    alone = [InferenceEngine(model).prefill([d], all_logits=True)[0][0] for d in (A, B, C)]
    torch.testing.assert_close(logits, torch.cat(alone), atol=1e-5, rtol=1e-5)
    (plain,), _ = InferenceEngine(model).prefill([stream], all_logits=True)
    assert (plain[len(A):] - logits[len(A):]).abs().max() > 1e-3  # without reset the state crosses the EOD


def test_decode_restarts_after_an_eod_in_a_batch(model):
    """Row 0 decodes through the end of A into B; row 1 (another position) goes on in C:
    row 0's logits after the EOD are B's alone, row 1's are C's."""
    engine = InferenceEngine(model, document_eod=EOD)
    _, state = engine.prefill([A[:-2], C[:3]])
    got0, got1 = [], []
    feed0 = torch.cat([A[-2:], B[:6]])
    for step in range(len(feed0)):
        logits = engine.decode(torch.tensor([int(feed0[step]), int(C[3 + step % 5])]), state)
        got0.append(logits[0])
        if step < 5:
            got1.append(logits[1])
    b_alone = InferenceEngine(model).prefill([B[:6]], all_logits=True)[0][0]
    torch.testing.assert_close(torch.stack(got0[2:]), b_alone, atol=1e-5, rtol=1e-5)
    c_alone = InferenceEngine(model).prefill([C[:8]], all_logits=True)[0][0]
    torch.testing.assert_close(torch.stack(got1), c_alone[3:8], atol=1e-5, rtol=1e-5)


def test_a_prompt_ending_with_its_eod_starts_the_next_document_empty(model):
    engine = InferenceEngine(model, document_eod=EOD)
    last, state = engine.prefill([A])
    torch.testing.assert_close(last[0], InferenceEngine(model).prefill([A])[0][0], atol=1e-5, rtol=1e-5)
    assert state.positions() == [0]
    logits = engine.decode(torch.tensor([int(B[0])]), state)
    torch.testing.assert_close(logits[0], InferenceEngine(model).prefill([B[:1]])[0][0], atol=1e-5, rtol=1e-5)


def test_a_run_trained_with_reset_exports_a_model_that_restarts_after_its_eod(tmp_path):
    """Pretraining with --reset-attention-mask -> HF export records megaseg.document_eod (the
    tokenizer's eos), and the exported transformers model runs a two-document stream as two
    documents; generate.py's auto mode finds the setting in both formats."""
    import io
    import json
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from megaseg.checkpoint.formats import read_model
    from megaseg.hf.convert import document_eod_of, export_hf_checkpoint
    from megaseg.megatron import parallel
    from megaseg.training.trainer import pretrain
    from tests.eval.test_modes_any_checkpoint import train_tokenizer
    from tests.training.synthetic import tiny_config

    class Packed:  # documents of random tokens ending with eos = 2, the tokenizer's
        config = SimpleNamespace(tokenizer=SimpleNamespace(eod=2))

        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(3, 60, (8, 33), generator=g)
            self.x[:, 11] = 2

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"tokens": self.x[i, :-1].clone(), "labels": self.x[i, 1:].clone()}

    tok = train_tokenizer(tmp_path / "tok.model")
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    try:
        cfg = tiny_config(tmp_path, train_iters=2, eval_iters=0, tokenizer_model=str(tok), reset_attention_mask=True,
                          reset_position_ids=True)
        pretrain(cfg, cfg.model_config(cfg.vocab_size), Packed(), out=io.StringIO())
    finally:
        parallel.destroy_model_parallel()
    ckpt = tmp_path / "ckpt"
    assert document_eod_of(read_model(ckpt, weights=False)) == 2
    export_hf_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["megaseg"]["document_eod"] == 2
    assert document_eod_of(read_model(tmp_path / "hf", weights=False)) == 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    a, b = [5, 9, 14, 22, 30, 41, 17, 8, 26, 33, 2], [11, 4, 27, 19, 35, 6, 23, 12, 40, 15]
    with torch.no_grad():
        stream = hf(torch.tensor([a + b])).logits[0, len(a):]
        alone = hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(stream, alone, atol=1e-5, rtol=1e-5)
