"""Context parallelism over segments (spawned gloo ranks) computes what one process computes.

CP2, CP4, CP2 x TP2 and CP2 x DP2 on a GQA model whose random head plan mixes all three
access modes, with an uneven last segment: for K = 0, 1, 2 the loss and every parameter
gradient (after the data x context-parallel reduction) equal the sequential TBPTT-K engine
on one process; K = -1 equals the one-pass (untruncated) gradient; the forward-only loss
equals one process's; the bytes the ranks hand to torch.distributed equal
`bytes_per_layer` summed over the layers.
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megaseg.config import LOCAL, RETRIEVAL, ModelConfig, SegmentConfig
from megaseg.megatron.convert import megatron_to_reference, reference_to_megatron
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.parallel.context import KINDS, ChunkLayout, SequenceChunk
from megaseg.parallel.traffic import bytes_per_layer
from megaseg.training.tbptt import segment_labels, tbptt_backward
from tests.megatron.conftest import random_head_plan
from tests.training.synthetic import rel_close

KS = (0, 1, 2, -1)
T, S = 37, 8  # segments of 8, 8, 8, 8 and an uneven 5


def _config() -> ModelConfig:
    return ModelConfig(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_layers=3, num_heads=8, num_kv_heads=4,
        head_dim=8, segment=SegmentConfig(segment_length=S, tail_length=3, retrieval_length=4, tbptt_k=1),
        head_plan=random_head_plan(3, 4, seed=7),
    )


def _sum_ce(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def _reference(cfg, ref_sd, tokens):
    """Per K: (loss, gradients by reference name) of one process; and the forward-only loss."""
    from megaseg.megatron.model import build_model, segment_forward

    meg = build_model(cfg, use_te=False)
    meg.load_state_dict(reference_to_megatron(ref_sd, cfg, 0, 1), strict=True)
    labels = segment_labels(tokens, None)
    out = {}
    for k in KS:
        meg.zero_grad()
        if k >= 0:
            loss = tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, S, k).loss
        else:
            logits, _ = segment_forward(meg, tokens, None)
            l = _sum_ce(logits, labels) / int((labels != -100).sum())
            l.backward()
            loss = l.item()
        out[k] = (loss, megatron_to_reference([{n: p.grad.clone() for n, p in meg.named_parameters()}], cfg))
    return out


def _layer_bytes(cfg, layout, batch, k, tp):
    """Formula bytes of all ranks for one step, by kind (each TP rank exchanges its own groups)."""
    total = dict.fromkeys(KINDS, 0)
    per = cfg.num_kv_heads // tp
    for layer in range(cfg.num_layers):
        for t in range(tp):
            modes = cfg.head_plan.layer(layer)[t * per : (t + 1) * per]
            got = bytes_per_layer(layout, batch=batch, tbptt_k=k, head_dim=cfg.head_dim,
                                  local_groups=modes.count(LOCAL), retrieval_groups=modes.count(RETRIEVAL),
                                  heads_per_group=cfg.heads_per_group, tail_length=cfg.segment.tail_length,
                                  retrieval_length=cfg.segment.retrieval_length, element_size=4)
            for kind, n in got.items():
                total[kind] += n
    return total


def _rank(rank, port, world, layouts, cfg, ref_sd, tokens, out_dir):
    """Each (tp, cp) layout in turn on the same ranks; rank 0 saves the results by layout."""
    from megaseg.megatron import parallel

    sent = dict.fromkeys(KINDS, 0)
    real_isend = dist.isend

    def counting_isend(tensor, dst=None, group=None, tag=0, **kw):
        sent[KINDS[tag % len(KINDS)]] += tensor.numel() * tensor.element_size()
        return real_isend(tensor, dst, group=group, tag=tag, **kw)

    dist.isend = counting_isend
    results = {}
    try:
        for tp, cp in layouts:
            parallel.initialize_model_parallel(tp=tp, cp=cp, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                               world_size=world, timeout_s=120)
            try:
                results[(tp, cp)] = _run_layout(tp, cp, cfg, ref_sd, tokens, sent)
            finally:
                parallel.destroy_model_parallel(destroy_process_group=False)
    finally:
        dist.isend = real_isend
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out_dir / "rank0.pt")


def _run_layout(tp, cp, cfg, ref_sd, tokens, sent):
    from megatron.core import parallel_state as ps

    from megaseg.megatron.model import build_model
    from megaseg.training.chunk import TrainingChunk, context_parallel_forward

    meg = build_model(cfg, use_te=False)
    tp_rank = ps.get_tensor_model_parallel_rank()
    meg.load_state_dict(reference_to_megatron(ref_sd, cfg, tp_rank, tp), strict=True)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = tokens.shape[0] // dp
    ids = tokens[dp_rank * rows : (dp_rank + 1) * rows]
    labels = segment_labels(tokens, None)[dp_rank * rows : (dp_rank + 1) * rows]
    n_pred = int((segment_labels(tokens, None) != -100).sum())
    layout = ChunkLayout(T, S, cp)
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    results = {}
    for k in KS:
        meg.zero_grad()
        for kind in KINDS:
            sent[kind] = 0
        chunk = TrainingChunk.for_this_rank(layout, k)
        a, b = chunk.token_range
        loss = _sum_ce(context_parallel_forward(meg, ids[:, a:b], chunk), labels[:, a:b]) / n_pred
        chunk.backward(loss)
        total = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(total, group=dp_cp)
        grads = {}
        for n, p in meg.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=dp_cp)
            grads[n] = g
        every = [None] * tp
        dist.all_gather_object(every, grads, group=ps.get_tensor_model_parallel_group())
        counted = torch.tensor([sent[kind] for kind in KINDS], dtype=torch.float64)
        dist.all_reduce(counted)
        results[k] = (total.item(), megatron_to_reference(every, cfg), dict(zip(KINDS, counted.tolist())))
    with torch.no_grad():  # forward-only (validation): the same code, no copies
        chunk = SequenceChunk.for_this_rank(layout)
        a, b = chunk.token_range
        loss = _sum_ce(context_parallel_forward(meg, ids[:, a:b], chunk), labels[:, a:b]) / n_pred
        chunk.finish()
        total = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(total, group=dp_cp)
    return {"ks": results, "eval": total.item()}


@pytest.fixture(scope="module")
def reference():
    from megaseg.megatron import parallel

    cfg = _config()
    torch.manual_seed(5)
    ref_sd = {k: v.clone() for k, v in SegmentedLlamaForCausalLM(cfg).state_dict().items()}
    tokens = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(3))
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    try:
        want = _reference(cfg, ref_sd, tokens)
    finally:
        parallel.destroy_model_parallel()
    # The truncation is visible: different K give different gradients.
    w = want[0][1]["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.allclose(w, want[1][1]["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.allclose(want[1][1]["model.layers.0.self_attn.k_proj.weight"],
                              want[2][1]["model.layers.0.self_attn.k_proj.weight"])
    return cfg, ref_sd, tokens, want


LAYOUTS = {"cp4": (1, 4), "cp2xtp2": (2, 2), "cp2xdp2": (1, 2)}  # (tp, cp) on 4 ranks


@pytest.fixture(scope="module")
def four_ranks(reference, tmp_path_factory):
    """The three layouts run one after another by the same 4 spawned ranks."""
    from megaseg.megatron.parallel import free_port

    cfg, ref_sd, tokens, _ = reference
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_rank, args=(free_port(), 4, list(LAYOUTS.values()), cfg, ref_sd, tokens, out), nprocs=4, join=True)
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_equals_one_process(reference, four_ranks, name):
    cfg, _, tokens, want = reference
    tp, cp = LAYOUTS[name]
    got = four_ranks[(tp, cp)]
    layout = ChunkLayout(T, S, cp)
    dp = 4 // (tp * cp)
    for k in KS:
        loss, grads, counted = got["ks"][k]
        want_loss, want_grads = want[k]
        assert rel_close(loss, want_loss), (k, loss, want_loss)
        assert set(grads) == set(want_grads)
        for param, g in want_grads.items():
            assert (grads[param] - g).abs().max().item() <= 1e-5 * g.abs().max().item(), (k, param)
        formula = {kind: n * dp for kind, n in _layer_bytes(cfg, layout, tokens.shape[0] // dp, k, tp).items()}
        assert counted == pytest.approx(formula), (k, counted, formula)
        assert counted["tail"] > 0 and counted["candidates"] > 0 and counted["prefix"] > 0
        assert (counted["tail_grad"] > 0) == (k != 0)
    assert rel_close(got["eval"], want[-1][0])
