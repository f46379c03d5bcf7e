"""What a pretraining checkpoint holds besides files: the sharded state dict of model,
optimizer, LR scheduler and RNG (megatron-core dist_checkpointing), and the RNG states and
parallel layout of this rank.

The distributed optimizer's state is saved in model space, so it reloads at any DP/TP/PP
size; RNG states are per (pipeline, tensor) rank, so they only restore under the layout
they were saved with (`parallel_layout`).
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA and megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        state["numpy"] = None
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        import numpy as np

        np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def parallel_layout() -> dict[str, int]:
    """The model-parallel layout RNG states are tied to (they are per TP/PP rank)."""
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
    }


def full_layout() -> dict[str, int]:
    """Every parallel size of the saving run (for inspection; loading reshards any of them)."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _sharded_rng(state):
    """RNG states as a ShardedObject: one per (pipeline, tensor) rank, replicated over DP."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors before a load.

    Without Apex or Transformer Engine its state dict reads the step count from the torch
    Adam state, which a fresh optimizer does not have yet; megatron-core's own dummy step
    (zero gradients) allocates it. Every value it touches is then replaced by the load.
    """
    if hasattr(optimizer, "allocate_state"):  # DeepSpeed ZeRO
        optimizer.allocate_state()
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            opt._init_optimizer_states_with_dummy_values()


def sharded_state_dict(model, optimizer, scheduler, *, is_loading: bool, with_optimizer: bool, with_rng: bool):
    """The dist_checkpointing state dict to save, or to load into: model, optimizer and (on
    save) scheduler when ``with_optimizer``, this rank's RNG states when ``with_rng``."""
    from megatron.core.utils import unwrap_model

    model_sd = unwrap_model(model).sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if with_optimizer and optimizer is not None:
        if is_loading:
            _allocate_optimizer_state(optimizer)
        # The distributed optimizer's state is saved in model space (one tensor per parameter,
        # like the replicated optimizer's), so it reloads at any DP/TP/PP size; the replicated
        # optimizer ignores the metadata.
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=OPTIMIZER_METADATA)
    if with_optimizer and scheduler is not None and not is_loading:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _sharded_rng(rng_state() if not is_loading else None)
    return sd
