"""Pipeline parallelism: the windows engine (megaseg.training.pipeline) gives the sequential
TBPTT-K engine's loss and every gradient, at pipeline size 1 and split over stages.

One spawn per layout (PP2, PP2 x TP2, PP2 x DP2; gloo, world <= 4) computes, for K = 0 and 1
and untied / tied embeddings, one step's loss and gradients (after finalize_model_grads:
the DP all-reduce and the tied-embedding all-reduce across stages) from the same initial
weights as the single-process reference, on a random head plan.
"""
import functools
import json

import pytest
import torch

from megaseg.config import ConfigError
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config

REL = 1e-5
TRAIN = PatternDataset(16, 32, seed=3)
CASES = [(k, tied) for k in (0, 1) for tied in (False, True)]


def _plan_file(directory):
    """A random head plan for 4 layers x 2 KV groups with `local` heads in every layer."""
    g = torch.Generator().manual_seed(11)
    modes = ("local", "retrieval", "segment")
    plan = [["local", modes[int(torch.randint(0, 3, (1,), generator=g))]] for _ in range(4)]
    plan[int(torch.randint(0, 4, (1,), generator=g))][1] = "retrieval"  # at least one retrieval head
    for row in plan:
        if int(torch.randint(0, 2, (1,), generator=g)):
            row.reverse()
    path = directory / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def _cfg(plan, k, tied, **overrides):
    return tiny_config(num_layers=4, head_plan_file=plan, tbptt_k=k, untie_embeddings_and_output_weights=not tied,
                       micro_batch_size=1, global_batch_size=4, **overrides)


def _step(cfg, initial_weights, windows_engine=False):
    """Loss, per-segment losses and {global megatron name: gradient} of this rank's shard after
    one forward/backward and finalize_model_grads, from ``initial_weights``."""
    from megatron.core.distributed import finalize_model_grads

    from megaseg.megatron.model import layer_indices
    from megaseg.training import pipeline
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.trainer import forward_backward, setup_model_and_optimizer

    model, _, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size), initial_weights)
    model.zero_grad_buffer()
    batches = rank_microbatches(TRAIN, 0, cfg)
    run = pipeline.forward_backward if windows_engine else forward_backward
    nll, seg_sum, seg_count, tokens, num_predicted = run(model, batches, cfg, False)
    finalize_model_grads([model])
    layers = layer_indices(model.module)
    grads = {}
    for name, p in model.module.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:  # stage-local -> global layer index
            parts[2] = str(layers[int(parts[2])])
        grads[".".join(parts)] = p.main_grad.detach().clone()
    return {"loss": nll / num_predicted, "seg": [s / c for s, c in zip(seg_sum, seg_count)], "grads": grads}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return _plan_file(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def reference(plan, model_parallel):
    """Single process, sequential engine: initial weights, loss and gradients per (K, tied)."""
    from megaseg.megatron.convert import megatron_to_reference
    from megaseg.training.trainer import setup_model_and_optimizer

    out = {}
    for k, tied in CASES:
        cfg = _cfg(plan, k, tied)
        mc = cfg.model_config(cfg.vocab_size)
        model, _, _ = setup_model_and_optimizer(cfg, mc)
        weights = megatron_to_reference([model.module.state_dict()], mc)
        result = _step(cfg, weights)
        out[(k, tied)] = dict(weights=weights, loss=result["loss"], seg=result["seg"],
                              grads=megatron_to_reference([result["grads"]], mc))
    return out


def _compare(got, want, where):
    assert rel_close(got["loss"], want["loss"], REL), (where, got["loss"], want["loss"])
    assert all(rel_close(a, b, REL) for a, b in zip(got["seg"], want["seg"])), (where, got["seg"], want["seg"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, w in want["grads"].items():
        err = (got["grads"][name] - w).norm().item()
        assert err <= REL * w.norm().item(), (where, name, err, w.norm().item())


def test_windows_engine_equals_the_sequential_engine_on_one_process(plan, reference):
    from megaseg.megatron.convert import megatron_to_reference

    for (k, tied), want in reference.items():
        cfg = _cfg(plan, k, tied)
        got = _step(cfg, want["weights"], windows_engine=True)
        got["grads"] = megatron_to_reference([got["grads"]], cfg.model_config(cfg.vocab_size))
        _compare(got, want, (k, tied))


def _layout_rank(rank, port, out_dir, tp, pp, world, plan, weights):
    from megatron.core import parallel_state as ps

    from megaseg.megatron import parallel

    torch.set_num_threads(1)
    parallel.initialize_model_parallel(tp=tp, pp=pp, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                       world_size=world, timeout_s=120)
    try:
        results = {case: _step(_cfg(plan, *case, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                               weights[case]) for case in CASES}
        layout = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_data_parallel_rank())
        torch.save({"layout": layout, "results": results}, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


LAYOUTS = {"pp2": (1, 2, 2), "pp2_tp2": (2, 2, 4), "pp2_dp2": (1, 2, 4)}  # tp, pp, world


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory, plan, reference):
    """(layout name, every rank's saved results) of one spawn of that layout."""
    tp, pp, world = LAYOUTS[request.param]
    weights = {case: ref["weights"] for case, ref in reference.items()}
    fn = functools.partial(_layout_rank, tp=tp, pp=pp, world=world, plan=plan, weights=weights)
    ranks, _ = spawn_ranks(fn, tmp_path_factory, request.param, nprocs=world)
    return request.param, ranks


def _whole_model(ranks, case, cfg):
    """One case's loss, per-segment losses and reference-named gradients of the whole model,
    assembled from the stages and tensor-parallel shards of data-parallel rank 0."""
    from megaseg.megatron.convert import megatron_to_reference

    by_tp = {}
    for rank in ranks:
        tp, pp, dp = rank["layout"]
        if dp == 0:
            by_tp.setdefault(tp, {}).update(rank["results"][case]["grads"])
    tied = case[1]
    if tied:  # the last stage's copy of the embedding got the same (all-reduced) gradient
        for grads in by_tp.values():
            torch.testing.assert_close(grads.pop("output_layer.weight"), grads["embedding.word_embeddings.weight"],
                                       rtol=0, atol=0)
    first = ranks[0]["results"][case]
    grads = megatron_to_reference([by_tp[t] for t in sorted(by_tp)], cfg.model_config(cfg.vocab_size))
    return {"loss": first["loss"], "seg": first["seg"], "grads": grads}


def test_pipeline_layouts_equal_the_single_process_loss_and_gradients(layout, plan, reference):
    name, ranks = layout
    for case in CASES:
        # every rank (every stage) knows the loss the last stage measured
        losses = [r["results"][case]["loss"] for r in ranks]
        assert all(rel_close(x, losses[0], 1e-12) for x in losses), (name, case, losses)
        _compare(_whole_model(ranks, case, _cfg(plan, *case)), reference[case], (name, case))


def test_k_changes_the_pipeline_gradients_but_not_the_loss(layout, plan):
    _, ranks = layout
    k0, k1 = (_whole_model(ranks, (k, False), _cfg(plan, k, False)) for k in (0, 1))
    assert rel_close(k0["loss"], k1["loss"], 1e-6)
    diff = max((k0["grads"][n] - k1["grads"][n]).norm().item() / k1["grads"][n].norm().item()
               for n in k1["grads"] if k1["grads"][n].norm() > 0)
    assert diff > 1e-3


def test_pipeline_size_must_divide_the_layers_and_virtual_stages_are_refused(tmp_path):
    from megaseg.training.arguments import parse_args

    with pytest.raises(ConfigError) as info:
        tiny_config(num_layers=3, pipeline_model_parallel_size=2)
    assert str(info.value).startswith("pipeline_model_parallel_size=2 is invalid") and "\n" not in str(info.value)
    for argv in (["--num-layers-per-virtual-pipeline-stage", "1"], ["--virtual-pipeline-model-parallel-size=2"]):
        with pytest.raises(ConfigError) as info:
            parse_args(argv)
        assert "virtual" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "run.yaml").write_text("num_layers_per_virtual_pipeline_stage: 2\n")
    with pytest.raises(ConfigError, match="num_layers_per_virtual_pipeline_stage=2 is invalid"):
        parse_args(["--config", str(tmp_path / "run.yaml")])
