"""Documents as the unit of state (docs/semantics.md, documents): with --reset-attention-mask a
packed document trains exactly as if alone, in one process, at CP 2 (a boundary inside a
chunk and one on the chunk edge) and at PP 2; with reset off it does not (the control).

The reference is independent of the training code's batching: the reference model runs each
document alone, one call over its own tokens (K >= segments - 1 makes TBPTT-K the full
gradient, so plain autograd of that call is the reference gradient)."""
import functools
from types import SimpleNamespace

import pytest
import torch

from megaseg.config import ConfigError
from tests.training.synthetic import rel_close, spawn_ranks, tiny_config

EOD = 63
T, S = 32, 8
# Document lengths (EOD included) of each packed sample: boundaries inside segments, on a
# segment edge and on the CP 2 chunk edge (16), and a sample with no boundary at all.
PACKING = [[13, 11, 20], [16, 9, 30], [5, 40], [40]]
REL = 1e-5


class PackedDataset:
    """GPTDataset-shaped samples of packed documents; ``config.tokenizer.eod`` as megatron's has."""

    config = SimpleNamespace(tokenizer=SimpleNamespace(eod=EOD))

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for lengths in PACKING:
            docs = [torch.cat([torch.randint(0, EOD, (n - 1,), generator=g), torch.tensor([EOD])]) for n in lengths]
            self.samples.append(torch.cat(docs)[: T + 1])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        x = self.samples[i]
        return {"tokens": x[:-1].clone(), "labels": x[1:].clone()}


DATA = PackedDataset()


def _cfg(k, reset=True, **overrides):
    return tiny_config(seq_length=T, segment_length=S, tail_length=4, retrieval_length=4, tbptt_k=k,
                       micro_batch_size=2, global_batch_size=4, reset_attention_mask=reset,
                       reset_position_ids=reset, **overrides)


def _step(cfg, weights=None):
    """(loss, {reference name: gradient}, initial reference weights) of one forward/backward."""
    from megatron.core.distributed import finalize_model_grads

    from megaseg.megatron.convert import megatron_to_reference
    from megaseg.megatron.model import layer_indices
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine
    from megaseg.training.setup import setup_model_and_optimizer

    mc = cfg.model_config(cfg.vocab_size)
    model, _, _ = setup_model_and_optimizer(cfg, mc, weights)
    model.zero_grad_buffer()
    result = select_engine(cfg, model, False).forward_backward(rank_microbatches(DATA, 0, cfg))
    finalize_model_grads([model])
    layers = layer_indices(model.module)
    grads = {}
    for name, p in model.module.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layers[int(parts[2])])
        grads[".".join(parts)] = p.main_grad.detach().clone()
    out = {"loss": result.loss, "grads": grads}
    if weights is None:
        out["weights"] = megatron_to_reference([model.module.state_dict()], mc)
    return out


def _documents_alone(cfg, weights):
    """Loss and gradients of every document run alone through the reference model."""
    from megaseg.checkpoint.weights import build_model

    model = build_model(cfg.model_config(cfg.vocab_size), weights).train()
    total, count = 0.0, 0
    for i in range(len(DATA)):
        sample = DATA[i]
        tokens, labels = sample["tokens"], sample["labels"]
        ends = [int(e) + 1 for e in torch.nonzero(tokens == EOD).flatten()]
        bounds = [0] + [e for e in ends if e < T] + [T]
        for s, e in zip(bounds[:-1], bounds[1:]):
            logits = model(tokens[None, s:e])[0][0]
            total = total + torch.nn.functional.cross_entropy(logits, labels[s:e], reduction="sum")
            count += e - s
    (total / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return float(total.detach()) / count, grads


@pytest.fixture(scope="module")
def one_process(model_parallel):
    from megaseg.megatron.convert import megatron_to_reference

    out = {}
    for k in (1, 3):
        cfg = _cfg(k)
        result = _step(cfg)
        result["grads"] = megatron_to_reference([result["grads"]], cfg.model_config(cfg.vocab_size))
        out[k] = result
    out["off"] = _step(_cfg(3, reset=False), out[3]["weights"])
    return out


def _compare(got, want, where):
    assert rel_close(got["loss"], want["loss"], REL), (where, got["loss"], want["loss"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, w in want["grads"].items():
        err = (got["grads"][name] - w).norm().item()
        assert err <= REL * max(w.norm().item(), 1e-12), (where, name, err, w.norm().item())


def test_a_packed_document_trains_as_if_alone(one_process):
    want_loss, want_grads = _documents_alone(_cfg(3), one_process[3]["weights"])
    _compare(one_process[3], {"loss": want_loss, "grads": want_grads}, "reset on, K=3")


def test_without_reset_state_crosses_the_eod(one_process):
    want_loss, _ = _documents_alone(_cfg(3), one_process[3]["weights"])
    assert abs(one_process["off"]["loss"] - want_loss) > 1e-4


def _layouts_rank(rank, port, out_dir, reference):
    from megaseg.megatron import parallel
    from megaseg.megatron.convert import megatron_to_reference

    torch.set_num_threads(1)
    parallel.init_process_group(rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=120)
    saved = {}
    try:
        for name, sizes in (("cp2", dict(cp=2)), ("pp2", dict(pp=2))):
            parallel.initialize_model_parallel(**sizes)
            flags = {"cp2": dict(context_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2)}[name]
            for k in (1, 3):
                cfg = _cfg(k, **flags)
                result = _step(cfg, reference[k]["weights"])
                if name == "cp2":  # every rank holds the whole model
                    result["grads"] = megatron_to_reference([result["grads"]], cfg.model_config(cfg.vocab_size))
                saved[(name, k)] = result
            parallel.destroy_model_parallel(destroy_process_group=False)
        torch.save(saved, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


@pytest.fixture(scope="module")
def layouts(one_process, tmp_path_factory):
    reference = {k: {"weights": one_process[k]["weights"]} for k in (1, 3)}
    ranks, _ = spawn_ranks(functools.partial(_layouts_rank, reference=reference), tmp_path_factory, "documents")
    return ranks


@pytest.mark.parametrize("k", [1, 3])
def test_context_parallel_documents_equal_one_process(layouts, one_process, k):
    for rank in layouts:
        _compare(rank[("cp2", k)], one_process[k], ("cp2", k))


@pytest.mark.parametrize("k", [1, 3])
def test_pipeline_documents_equal_one_process(layouts, one_process, k):
    from megaseg.megatron.convert import megatron_to_reference

    cfg = _cfg(k)
    mc = cfg.model_config(cfg.vocab_size)
    stages = [rank[("pp2", k)] for rank in layouts]
    assert rel_close(stages[0]["loss"], one_process[k]["loss"], REL) and rel_close(stages[1]["loss"], one_process[k]["loss"], REL)
    merged = {**stages[1]["grads"], **stages[0]["grads"]}  # stage 0 owns the (tied) embedding's gradient
    _compare({"loss": stages[0]["loss"], "grads": megatron_to_reference([merged], mc)}, one_process[k], ("pp2", k))


def test_document_rows_keep_the_micro_batch_shape():
    from megaseg.training.batches import document_microbatches, get_batch

    batches = [get_batch(DATA, 0, 2, T), get_batch(DATA, 2, 2, T)]
    rows = document_microbatches(batches, EOD, 2)
    assert all(t.shape == (2, T) and lab.shape == (2, T) for t, lab in rows)
    # 3 + 3 + 2 + 1 documents (the last of each sample is cut by the sample's end), one empty row
    assert len(rows) == 5
    kept = sum(int((lab != -100).sum()) for _, lab in rows)
    assert kept == sum(int((lab != -100).sum()) for _, lab in batches)
    assert int((rows[-1][1][1] != -100).sum()) == 0


def test_reset_flags_go_together():
    with pytest.raises(ConfigError, match="reset_position_ids=True is invalid.*must equal reset_attention_mask"):
        tiny_config(reset_position_ids=True)


def test_eod_mask_loss_masks_the_prediction_after_each_eod(small_data):
    from megaseg.data.datasets import build_train_valid_datasets
    from megaseg.data.tokenizer import validate_tokenizer
    from megaseg.training.batches import get_batch

    prefix, tokenizer = small_data
    tok = validate_tokenizer(tokenizer)
    data = build_train_valid_datasets([prefix], tok, seq_length=256, num_samples=(200, 0, 0), split="100,0,0",
                                      eod_mask_loss=True)
    tokens, labels = get_batch(data.train, 0, 200, 256)
    assert bool((tokens == tok.eod).any())
    assert bool((labels[tokens == tok.eod] == -100).all()) and bool((labels[tokens != tok.eod] != -100).all())
