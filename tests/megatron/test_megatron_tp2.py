"""Tensor parallel TP = 2 (two spawned gloo ranks) computes what TP = 1 computes."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaseg.megatron.convert import megatron_to_reference, reference_to_megatron
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.tbptt import tbptt_backward


def _tp1_run(cfg, ref_sd, tokens):
    """One-pass logits and TBPTT-1 gradients (reference names) of a TP = 1 megatron model."""
    from megaseg.megatron.model import build_model, segment_forward

    meg = build_model(cfg, use_te=False)
    meg.load_state_dict(reference_to_megatron(ref_sd, cfg, 0, 1), strict=True)
    with torch.no_grad():
        logits, _ = segment_forward(meg, tokens, None)
    tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, cfg.segment.segment_length, k=1)
    grads = megatron_to_reference([{n: p.grad for n, p in meg.named_parameters()}], cfg)
    return logits, grads


def _check_case(rank, cfg, ref_sd, tokens, want_logits, want_grads):
    from megaseg.megatron.model import build_model, segment_forward

    meg = build_model(cfg, use_te=False)
    meg.load_state_dict(reference_to_megatron(ref_sd, cfg, rank, 2), strict=True)
    core = meg.decoder.layers[0].self_attention.core_attention
    assert core.kv_groups == ((0, 2) if rank == 0 else (2, 4))
    assert core.operator.modes == cfg.head_plan.layer(0)[core.kv_groups[0] : core.kv_groups[1]]
    S = cfg.segment.segment_length
    with torch.no_grad():
        logits, _ = segment_forward(meg, tokens, None)
        assert (logits - want_logits).abs().max().item() <= 1e-5
        states, pieces = None, []
        for start in range(0, tokens.shape[1], S):
            piece, states = segment_forward(meg, tokens[:, start : start + S], states)
            pieces.append(piece)
        assert (torch.cat(pieces, 1) - want_logits).abs().max().item() <= 1e-5
        assert states[0].open_k.shape[2] == cfg.num_kv_heads // 2  # each rank holds its own KV groups

    tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, S, k=1)
    every = [None, None]
    dist.all_gather_object(every, {n: p.grad for n, p in meg.named_parameters()})
    grads = megatron_to_reference(every, cfg)
    for name, want in want_grads.items():
        assert (grads[name] - want).abs().max().item() <= 1e-5 * want.abs().max().item(), name

    # Sequence parallel: same logits (every call's length must divide by the TP size).
    sp = build_model(cfg, use_te=False, config_overrides={"sequence_parallel": True})
    sp.load_state_dict(reference_to_megatron(ref_sd, cfg, rank, 2), strict=True)
    with torch.no_grad():
        states, pieces = None, []
        for start in range(0, 16, S):
            piece, states = segment_forward(sp, tokens[:, start : start + S], states)
            pieces.append(piece)
    assert (torch.cat(pieces, 1) - want_logits[:, :16]).abs().max().item() <= 1e-5


def _tp2_rank(rank, port, cases):
    from megaseg.megatron import parallel

    parallel.initialize_model_parallel(
        tp=2, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout_s=120
    )
    try:
        for case in cases:
            _check_case(rank, *case)
    finally:
        parallel.destroy_model_parallel()


def test_tp2_logits_and_tbptt_gradients_equal_tp1(make_cfg, tokens, model_parallel):
    """Untied and tied embeddings; a head plan whose TP halves have different `local` layers."""
    from megaseg.megatron.parallel import free_port

    cases = []
    for tied in (False, True):
        cfg = make_cfg(tied)
        torch.manual_seed(5)
        ref_sd = {k: v.clone() for k, v in SegmentedLlamaForCausalLM(cfg).state_dict().items()}
        cases.append((cfg, ref_sd, tokens, *_tp1_run(cfg, ref_sd, tokens)))
    mp.spawn(_tp2_rank, args=(free_port(), cases), nprocs=2, join=True)
