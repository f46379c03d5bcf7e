"""megatron-core 0.16.1 on CPU through megaseg.megatron.cpu_compat and .parallel.

A two-layer, hidden-32 GPTModel on the local (non-TE) layer spec, in one gloo process and
in two spawned gloo processes (TP=2, PP=2) checked against single-rank references.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megaseg.megatron import cpu_compat, parallel

VOCAB = 128
SEQ = 16
WORLD_SIZE = 2


def build_tiny_gpt(seed: int = 7):
    """Same seed, same full weights whatever the TP size (master weights built on CPU).

    Under pipeline parallelism each rank builds its own stage (one layer per stage at PP=2).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=True,
    )


def batch(batch_size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch_size, -1)
    return tokens[:, :-1], position_ids, tokens[:, 1:]


def full_logits(model, tokens, position_ids):
    """[b, s, vocab] logits, gathered over the TP group (the model returns a vocab shard)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(model(tokens, position_ids, None)).clone()


def gather_full(model, grads: bool = False) -> dict:
    """name -> full (unsharded) parameter or gradient, gathered over the TP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    full = {}
    for name, param in model.named_parameters():
        tensor = (param.main_grad if hasattr(param, "main_grad") else param.grad) if grads else param
        tensor = tensor.detach()
        if getattr(param, "tensor_model_parallel", False) and world > 1:
            assert getattr(param, "partition_stride", 1) == 1, name
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        full[name] = tensor.clone()
    return full


@pytest.fixture(scope="module")
def single_rank():
    """TP = PP = 1 in this process; an existing TP = PP = 1 state is shared, not replaced."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert parallel_state.get_pipeline_model_parallel_world_size() == 1
        yield
        return
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    yield
    parallel.destroy_model_parallel()


def _loss(model, tokens, position_ids, labels):
    per_token = model(tokens, position_ids, None, labels=labels)
    return per_token.float().mean()


def test_apply_installs_cpu_torch_only_inside_megatron_core(single_rank):
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.utils as mcore_utils

    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True
    assert cpu_compat.is_applied()
    assert mcore_utils.torch is not torch
    assert mcore_utils.torch.cuda.current_device() == torch.device("cpu")
    assert mcore_utils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert layers.torch.Tensor is torch.Tensor
    import megatron.core.models.bert.bert_model as imported_after_apply

    assert imported_after_apply.torch is mcore_utils.torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_apply_refuses_another_megatron_core_version(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(cpu_compat.CpuCompatError, match=r"megatron-core 0\.16\.1.*found 0\.17\.0"):
        cpu_compat.apply()


def test_apply_is_a_no_op_when_cuda_is_available():
    script = textwrap.dedent(
        """
        import warnings; warnings.filterwarnings("ignore")
        import torch
        torch.cuda.is_available = lambda: True
        import megatron.core.utils as mcore_utils
        from megatron.core.tensor_parallel import random as mp_random
        from megaseg.megatron import cpu_compat
        get_state = mp_random._get_cuda_rng_state
        assert cpu_compat.apply() is False
        assert not cpu_compat.is_applied()
        assert mcore_utils.torch is torch
        assert mp_random._get_cuda_rng_state is get_state
        print("untouched")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "untouched" in result.stdout


def test_rng_tracker_forks_the_cpu_generator(single_rank):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the tracked stream must advance between forks"
    assert not torch.equal(first, torch.rand(4)), "tracked and default streams must differ"


def test_gpt_forward_backward_on_local_spec(single_rank):
    model = build_tiny_gpt()
    tokens, position_ids, labels = batch()
    logits = model(tokens, position_ids, None)
    assert logits.shape == (2, SEQ, VOCAB)
    loss = _loss(model, tokens, position_ids, labels)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got no gradient"


def test_megatron_optimizer_step_clips_gradients(single_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    clip = 0.05
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=clip, params_dtype=torch.float32),
        [ddp],
    )
    tokens, position_ids, labels = batch()
    losses = []
    for _ in range(4):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = _loss(ddp, tokens, position_ids, labels)
        loss.backward()
        ddp.finish_grad_sync()
        unclipped = torch.linalg.vector_norm(
            torch.stack([p.main_grad.norm() for p in model.parameters()])
        ).item()
        before = [p.detach().clone() for p in model.parameters()]
        ok, grad_norm, _ = optimizer.step()
        assert ok
        assert grad_norm == pytest.approx(unclipped, rel=1e-4)
        assert unclipped > clip
        clipped = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        ).item()
        assert clipped == pytest.approx(clip, rel=1e-3)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_params_train_through_the_float16_optimizer(single_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
    from megatron.core.transformer.module import Float16Module

    model = build_tiny_gpt()
    model.config.bf16 = True
    model = Float16Module(model.config, model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, clip_grad=1.0), [ddp]
    )
    assert isinstance(optimizer.chained_optimizers[0], Float16OptimizerWithFloat16Params)
    main_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert main_params and all(p.dtype == torch.float32 for p in main_params)
    tokens, position_ids, labels = batch()
    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = _loss(ddp, tokens, position_ids, labels)
        loss.backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0]
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dist_checkpoint_round_trip_of_model_state(single_rank, tmp_path):
    from megatron.core import dist_checkpointing

    source = build_tiny_gpt(seed=11).eval()
    dist_checkpointing.save(
        source.sharded_state_dict(), str(tmp_path), sharded_strategy=("torch_dist", 1)
    )
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["sharded_backend"] == "torch_dist"

    target = build_tiny_gpt(seed=12).eval()
    assert any(
        not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters())
    ), "different seeds must give different weights for this test to mean anything"
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path)))
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name
    tokens, position_ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(target(tokens, position_ids, None), source(tokens, position_ids, None))


def _forward_backward(model, tokens, position_ids, labels):
    logits = full_logits(model, tokens, position_ids)
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    return logits.detach(), loss.detach()


def _tp2_matches_tp1(rank, port):
    import warnings

    warnings.filterwarnings("ignore")

    parallel.init_process_group(
        rank=rank, world_size=WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}"
    )
    tokens, position_ids, labels = batch()

    parallel.initialize_model_parallel(tp=2, seed=5)
    tp2 = build_tiny_gpt(seed=3).eval()
    assert tp2.decoder.layers[0].mlp.linear_fc1.weight.shape == (4 * 32 // 2, 32)
    tp2_logits, tp2_loss = _forward_backward(tp2, tokens, position_ids, labels)
    tp2_weights = gather_full(tp2)
    tp2_grads = gather_full(tp2, grads=True)
    parallel.destroy_model_parallel(destroy_process_group=False)

    parallel.initialize_model_parallel(tp=1, seed=5)
    tp1 = build_tiny_gpt(seed=3).eval()
    tp1_logits, tp1_loss = _forward_backward(tp1, tokens, position_ids, labels)
    tp1_weights = gather_full(tp1)
    tp1_grads = gather_full(tp1, grads=True)

    assert tp2_weights.keys() == tp1_weights.keys()
    for name in tp1_weights:
        assert torch.equal(tp2_weights[name], tp1_weights[name]), f"weight {name}"
    torch.testing.assert_close(tp2_logits, tp1_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp2_loss, tp1_loss, rtol=1e-6, atol=1e-6)
    for name in tp1_grads:
        torch.testing.assert_close(tp2_grads[name], tp1_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    parallel.destroy_model_parallel()


def test_tp2_logits_and_grads_match_tp1_with_same_weights():
    mp.spawn(_tp2_matches_tp1, args=(parallel.free_port(),), nprocs=WORLD_SIZE, join=True)


def _train_step(model, microbatches):
    """One forward/backward over `microbatches` with megatron's schedule for the current PP."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens, position_ids, labels = next(data_iterator)
        output = model(tokens, position_ids, None, labels=labels)

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0][0].shape[1],
        micro_batch_size=microbatches[0][0].shape[0],
    )
    return [entry["loss"] for entry in losses]


def _global_layer_names(model, first_layer: int) -> dict:
    """local parameter name -> name in the single-stage model (layers renumbered)."""
    names = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + first_layer)
        names[name] = ".".join(parts)
    return names


def _pp2_matches_pp1(rank, port):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    parallel.init_process_group(
        rank=rank, world_size=WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}"
    )
    microbatches = [batch(batch_size=1, seed=s) for s in range(3)]

    parallel.initialize_model_parallel(pp=1, seed=5)
    reference = build_tiny_gpt(seed=3)
    reference_losses = _train_step(reference, microbatches)
    weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
    parallel.destroy_model_parallel(destroy_process_group=False)

    parallel.initialize_model_parallel(pp=2, seed=5)
    stage = build_tiny_gpt(seed=100 + rank)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    assert (first, last) == (rank == 0, rank == 1)
    assert len(stage.decoder.layers) == 1

    # Tied embeddings: the last stage's output layer starts as a copy of the first
    # stage's embedding (an all-reduce over the embedding group at construction).
    tied = stage.embedding.word_embeddings.weight if first else stage.output_layer.weight
    other = torch.empty_like(tied)
    dist.broadcast(other.copy_(tied.detach()), src=0)
    torch.testing.assert_close(tied.detach(), other, rtol=0, atol=0)

    names = _global_layer_names(stage, first_layer=rank)
    with torch.no_grad():
        for name, param in stage.named_parameters():
            source = "embedding.word_embeddings.weight" if name == "output_layer.weight" else names[name]
            param.copy_(weights[source])
    losses = _train_step(stage, microbatches)

    if last:
        assert len(losses) == len(microbatches)
        for got, want in zip(losses, reference_losses):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert losses == []
    for name, param in stage.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            continue
        torch.testing.assert_close(param.grad, grads[names[name]], rtol=1e-4, atol=1e-6, msg=name)
    tied_grad = tied.grad.detach().clone()
    dist.all_reduce(tied_grad)
    torch.testing.assert_close(
        tied_grad, grads["embedding.word_embeddings.weight"], rtol=1e-4, atol=1e-6
    )
    parallel.destroy_model_parallel()


def test_pp2_one_f_one_b_matches_single_stage_losses_and_grads():
    mp.spawn(_pp2_matches_pp1, args=(parallel.free_port(),), nprocs=WORLD_SIZE, join=True)
