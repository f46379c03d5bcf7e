"""Pipeline parallelism: the windows engine (megaseg.training.pipeline) gives the sequential
TBPTT-K engine's loss and every gradient, at pipeline size 1 and split over stages.

One spawn per layout (PP2, PP2 x TP2, PP2 x DP2; gloo, world <= 4) computes, for K = 0 and 1
and untied / tied embeddings, one step's loss and gradients (after finalize_model_grads:
the DP all-reduce and the tied-embedding all-reduce across stages) from the same initial
weights as the single-process reference, on a random head plan.
"""
import functools
import io
import json

import pytest
import torch

from megaseg.config import ConfigError
from tests.training.synthetic import PatternDataset, rel_close, spawn_ranks, tiny_config

REL = 1e-5
TRAIN = PatternDataset(16, 32, seed=3)
VALID = PatternDataset(8, 32, seed=4)
CASES = [(k, tied) for k in (0, 1) for tied in (False, True)]
RUN_CASE = (1, True)  # the settings of the pretraining runs that save and resume checkpoints


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


def _run_cfg(plan, directory, **overrides):
    """A short pretraining run (K = 1, tied embeddings) that validates every second step."""
    values = dict(lr_decay_iters=3, eval_interval=2, eval_iters=1, save=str(directory / "ckpt"))
    values.update(overrides)
    return _cfg(plan, *RUN_CASE, **values)


def _step(cfg, initial_weights, windows_engine=False):
    """Loss, per-segment losses and {global megatron name: gradient} of this rank's shard after
    one forward/backward and finalize_model_grads, from ``initial_weights``."""
    from megatron.core.distributed import finalize_model_grads

    from megaseg.megatron.model import layer_indices
    from megaseg.training import pipeline
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine
    from megaseg.training.setup import setup_model_and_optimizer

    model, _, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size), initial_weights)
    model.zero_grad_buffer()
    batches = rank_microbatches(TRAIN, 0, cfg)
    engine = pipeline.PipelineEngine(model, cfg, False) if windows_engine else select_engine(cfg, model, False)
    result = engine.forward_backward(batches)
    finalize_model_grads([model])
    layers = layer_indices(model.module)
    grads = {}
    for name, p in model.module.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:  # stage-local -> global layer index
            parts[2] = str(layers[int(parts[2])])
        grads[".".join(parts)] = p.main_grad.detach().clone()
    return {"loss": result.loss, "seg": result.segment_losses, "grads": grads}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return _plan_file(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def reference(plan, model_parallel, tmp_path_factory):
    """Single process, sequential engine: initial weights, loss and gradients per (K, tied)."""
    from megaseg.megatron.convert import megatron_to_reference
    from megaseg.training.setup import setup_model_and_optimizer
    from megaseg.training.trainer import pretrain

    out = {}
    for k, tied in CASES:
        cfg = _cfg(plan, k, tied)
        mc = cfg.model_config(cfg.vocab_size)
        model, _, _ = setup_model_and_optimizer(cfg, mc)
        weights = megatron_to_reference([model.module.state_dict()], mc)
        result = _step(cfg, weights)
        out[(k, tied)] = dict(weights=weights, loss=result["loss"], seg=result["seg"],
                              grads=megatron_to_reference([result["grads"]], mc))
    # three optimizer steps with validation, checkpoints at iterations 2 and 3
    cfg = _run_cfg(plan, tmp_path_factory.mktemp("reference_run"), train_iters=3, save_interval=2)
    run = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO(),
                   initial_weights=out[RUN_CASE]["weights"])
    out["run"] = dict(losses=run.losses, valid=run.valid_losses, save=cfg.save)
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

    for k, tied in CASES:
        want = reference[(k, tied)]
        cfg = _cfg(plan, k, tied)
        got = _step(cfg, want["weights"], windows_engine=True)
        got["grads"] = megatron_to_reference([got["grads"]], cfg.model_config(cfg.vocab_size))
        _compare(got, want, (k, tied))


def _pipeline_rank(rank, port, out_dir, world, plan, reference):
    """PP2 (world 2), or TP2 x PP2 then PP2 x DP2 (world 4) with the checkpoint round trip at TP2 x PP2."""
    from megatron.core import parallel_state as ps

    from megaseg.megatron import parallel
    from megaseg.training.trainer import pretrain

    torch.set_num_threads(1)
    parallel.init_process_group(rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=120)
    layouts = [("pp2", 1)] if world == 2 else [("pp2_tp2", 2), ("pp2_dp2", 1)]
    saved = {}
    try:
        for name, tp in layouts:
            parallel.initialize_model_parallel(tp=tp, pp=2)
            sizes = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=2)
            results = {case: _step(_cfg(plan, *case, **sizes), reference[case]["weights"]) for case in CASES}
            layout = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                      ps.get_data_parallel_rank())
            saved[name] = {"layout": layout, "results": results}
            if name == "pp2":
                saved["skip"] = _non_finite_step(_cfg(plan, *RUN_CASE, **sizes))
            if name == "pp2_tp2":
                cfg = _run_cfg(plan, out_dir, train_iters=2, **sizes)
                run = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO(),
                               initial_weights=reference[RUN_CASE]["weights"])
                resumed = pretrain(_run_cfg(plan, out_dir, train_iters=3, save=None, **sizes,
                                            load=str(reference["run"]["save"]) + "/iter_0000002"),
                                   cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO())
                saved["run"] = dict(losses=run.losses, valid=run.valid_losses, checkpoint=run.last_checkpoint,
                                    resumed=resumed.losses, resumed_valid=resumed.valid_losses)
            parallel.destroy_model_parallel(destroy_process_group=False)
        torch.save(saved, out_dir / f"rank{rank}.pt")
    finally:
        parallel.destroy_model_parallel()


def _non_finite_step(cfg):
    """One train_step whose gradients turn NaN on the first stage only (as an overflow there
    would): (update made, weights unchanged) on this rank."""
    from megatron.core import parallel_state as ps

    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer

    model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = select_engine(cfg, model, bf16=False)
    real = engine.forward_backward

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if ps.is_pipeline_first_stage():
            for p in model.parameters():
                p.main_grad.fill_(float("nan"))
        return out

    engine.forward_backward = poisoned
    metrics = train_step(engine, optimizer, scheduler, rank_microbatches(TRAIN, 0, cfg))
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return metrics.update_successful, unchanged


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, plan, reference):
    """{layout name: every rank's results}; "run": the TP2 x PP2 pretraining runs of every rank."""
    out = {}
    for world in (2, 4):
        fn = functools.partial(_pipeline_rank, world=world, plan=plan, reference=reference)
        ranks, out_dir = spawn_ranks(fn, tmp_path_factory, f"pipeline{world}", nprocs=world)
        for name in ranks[0]:
            out[name] = [r[name] for r in ranks]
    return out


def _whole_model(ranks, case, cfg):
    """One case's loss, per-segment losses and reference-named gradients of the whole model,
    assembled from the stages and tensor-parallel shards of data-parallel rank 0."""
    from megaseg.megatron.convert import megatron_to_reference

    by_tp = {}
    for rank in ranks:
        tp, pp, dp = rank["layout"]
        if dp == 0:
            by_tp.setdefault(tp, {}).update(rank["results"][case]["grads"])
    if case[1]:  # tied: the last stage's copy of the embedding got the same (all-reduced) gradient
        for grads in by_tp.values():
            torch.testing.assert_close(grads.pop("output_layer.weight"), grads["embedding.word_embeddings.weight"],
                                       rtol=0, atol=0)
    first = ranks[0]["results"][case]
    grads = megatron_to_reference([by_tp[t] for t in sorted(by_tp)], cfg.model_config(cfg.vocab_size))
    return {"loss": first["loss"], "seg": first["seg"], "grads": grads}


@pytest.mark.parametrize("name", ["pp2", "pp2_tp2", "pp2_dp2"])
def test_pipeline_layouts_equal_the_single_process_loss_and_gradients(spawned, name, plan, reference):
    ranks = spawned[name]
    for case in CASES:
        # every rank (every stage) knows the loss the last stage measured
        losses = [r["results"][case]["loss"] for r in ranks]
        assert all(rel_close(x, losses[0], 1e-12) for x in losses), (name, case, losses)
        _compare(_whole_model(ranks, case, _cfg(plan, *case)), reference[case], (name, case))


def test_k_changes_the_pipeline_gradients_but_not_the_loss(spawned, plan):
    ranks = spawned["pp2"]
    k0, k1 = (_whole_model(ranks, (k, False), _cfg(plan, k, False)) for k in (0, 1))
    assert rel_close(k0["loss"], k1["loss"], 1e-6)
    diff = max((k0["grads"][n] - k1["grads"][n]).norm().item() / k1["grads"][n].norm().item()
               for n in k1["grads"] if k1["grads"][n].norm() > 0)
    assert diff > 1e-3


def test_a_non_finite_stage_skips_the_step_on_every_stage(spawned):
    assert spawned["skip"] == [(False, True), (False, True)]


def _close_list(got, want):
    return len(got) == len(want) and all(rel_close(a, b, REL) for a, b in zip(got, want))


def _close_valid(got, want):
    return [i for i, _ in got] == [i for i, _ in want] and _close_list([v for _, v in got], [v for _, v in want])


def test_pipeline_pretraining_validates_and_saves_like_one_process(spawned, reference):
    want = reference["run"]
    for rank in spawned["run"]:
        assert _close_list(rank["losses"], want["losses"][:2]), (rank["losses"], want["losses"])
        assert _close_valid(rank["valid"], want["valid"][:1]), (rank["valid"], want["valid"])


def test_checkpoint_saved_at_one_process_resumes_at_tp2_pp2(spawned, reference):
    want = reference["run"]
    for rank in spawned["run"]:
        assert _close_list(rank["resumed"], want["losses"][2:]), (rank["resumed"], want["losses"])
        assert _close_valid(rank["resumed_valid"], want["valid"][1:]), (rank["resumed_valid"], want["valid"])


def test_checkpoint_saved_at_tp2_pp2_resumes_at_one_process_and_exports(spawned, reference, plan, tmp_path):
    from megaseg.checkpoint.training import read_training_weights
    from megaseg.training.trainer import pretrain
    from tests.hf.tiny_hf import load_tool

    want = reference["run"]
    checkpoint = spawned["run"][0]["checkpoint"]
    cfg = _run_cfg(plan, tmp_path, train_iters=3, save=None, load=checkpoint)
    resumed = pretrain(cfg, cfg.model_config(cfg.vocab_size), TRAIN, VALID, out=io.StringIO())
    assert resumed.start_iteration == 2 and _close_list(resumed.losses, want["losses"][2:]), resumed.losses
    # the weights read offline equal those of the one-process run's checkpoint at the same iteration
    sd, model_cfg, common = read_training_weights(checkpoint)
    ref_sd, _, _ = read_training_weights(want["save"] + "/iter_0000002")
    assert common["layout"]["pipeline_model_parallel_size"] == 2 and common["layout"]["tensor_model_parallel_size"] == 2
    assert sd.keys() == ref_sd.keys()
    for name, w in ref_sd.items():
        assert (sd[name] - w).norm() <= REL * w.norm(), name
    convert = load_tool("convert_hf")
    assert convert.main(["export", checkpoint, str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


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


def test_deepspeed_with_pipeline_stages_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        tiny_config(pipeline_model_parallel_size=2, deepspeed=True, deepspeed_config=str(tmp_path / "ds.json"))
    message = str(info.value)
    assert message.startswith("pipeline_model_parallel_size=2 is invalid") and "deepspeed" in message
    assert "\n" not in message
