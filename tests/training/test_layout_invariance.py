"""A fresh run's weights, and so its loss curve, are the same at every parallel layout: the
same seed gives the one-process losses at PP 2, TP 2, CP 2 and DP 2 (one spawn, layouts in turn) and
at PP 2 x TP 2 (four ranks);
and a DP 2 run resumed on one process reads the same samples in the same order."""
import io

import pytest
import torch

from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config

TRAIN = PatternDataset(32, 32, seed=5)
LAYOUTS = {"pp2": dict(pp=2), "tp2": dict(tp=2), "cp2": dict(cp=2), "dp2": dict()}
FLAGS = {"pp2": dict(pipeline_model_parallel_size=2), "tp2": dict(tensor_model_parallel_size=2),
         "cp2": dict(context_parallel_size=2), "dp2": dict()}


def _losses(**flags):
    cfg = tiny_config(train_iters=3, lr_decay_iters=3, eval_iters=0, micro_batch_size=1, global_batch_size=4,
                      untie_embeddings_and_output_weights=False, **flags)
    return pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, None, out=io.StringIO()).losses


def _rank(rank, port, out_dir):
    from megaseg.megatron import parallel

    torch.set_num_threads(1)
    parallel.init_process_group(rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=120)
    saved = {}
    try:
        for name, sizes in LAYOUTS.items():
            parallel.initialize_model_parallel(**sizes)
            save = dict(save=str(out_dir / "dp2"), save_interval=2) if name == "dp2" else {}
            saved[name] = _losses(**FLAGS[name], **save)
            if name == "cp2":
                saved["nan"] = _nan_forward_step(rank)
            parallel.destroy_model_parallel(destroy_process_group=False)
        torch.save(saved, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


def _nan_forward_step(rank):
    """One train_step at CP 2 whose forward turns NaN in one segment of rank 1's chunk only:
    (update made, weights unchanged) on this rank."""
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer

    cfg = tiny_config(context_parallel_size=2, micro_batch_size=1, global_batch_size=4, eval_iters=0)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def poison(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[: cfg.segment_length] = float("nan")  # [tokens, batch, hidden]: the chunk's first segment
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.module.decoder.layers[0].register_forward_hook(poison) if rank == 1 else None
    try:
        metrics = train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, rank_microbatches(TRAIN, 0, cfg))
    finally:
        if handle is not None:
            handle.remove()
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return metrics.update_successful, unchanged


@pytest.fixture(scope="module")
def curves(model_parallel, tmp_path_factory):
    one = _losses()
    ranks, out_dir = spawn_ranks(_rank, tmp_path_factory, "layouts")
    resumed = _losses(load=str(out_dir / "dp2" / "iter_0000002"))  # DP 2's checkpoint, one process
    return one, ranks, resumed


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_fresh_run_has_the_one_process_loss_curve_at_every_layout(curves, layout):
    one, ranks, _ = curves
    for rank in ranks:
        got = rank[layout]
        assert len(got) == len(one) and all(rel_close(a, b, 1e-5) for a, b in zip(got, one)), (layout, got, one)
    assert one[-1] < one[0]


def test_a_nan_in_one_ranks_forward_skips_the_step_on_every_rank(curves):
    _, ranks, _ = curves
    assert [rank["nan"] for rank in ranks] == [(False, True), (False, True)]


def test_a_dp2_checkpoint_resumes_on_one_process_with_the_same_samples(curves):
    one, _, resumed = curves
    assert len(resumed) == 1 and rel_close(resumed[0], one[2], 1e-5), (resumed, one)


def test_initial_weights_depend_on_the_seed_and_name_only():
    from megaseg.training.initialization import initial_weights

    cfg = tiny_config().model_config(64)
    a, b, c = initial_weights(cfg, 1), initial_weights(cfg, 1), initial_weights(cfg, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    q0, q1 = a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)  # every parameter has a stream of its own
    assert abs(float(a["model.layers.0.mlp.down_proj.weight"].std()) - 0.02 / 2) < 2e-3  # 1/sqrt(2 x 2 layers)


def _pp2_tp2_rank(rank, port, out_dir):
    from megaseg.megatron import parallel

    torch.set_num_threads(1)
    parallel.init_process_group(rank=rank, world_size=4, init_method=f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        parallel.initialize_model_parallel(tp=2, pp=2)
        losses = _losses(pipeline_model_parallel_size=2, tensor_model_parallel_size=2)
        torch.save(losses, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


def test_a_fresh_pp2_tp2_run_has_the_one_process_loss_curve(curves, tmp_path_factory):
    one = curves[0]
    ranks, _ = spawn_ranks(_pp2_tp2_rank, tmp_path_factory, "pp2tp2", nprocs=4)
    for got in ranks:
        assert len(got) == len(one) and all(rel_close(a, b, 1e-5) for a, b in zip(got, one)), (got, one)
