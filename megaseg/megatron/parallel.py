"""Process-group and model-parallel setup for megatron-core, on CPU (gloo) or GPU (nccl).

    initialize_model_parallel(tp=2, pp=1, seed=1234)   # world from torchrun env or 1 process
    ...build models, train...
    destroy_model_parallel()

On a machine without CUDA the megatron-core CPU compatibility layer is applied first.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megaseg.megatron import cpu_compat

_owns_process_group = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Create the default process group unless one exists.

    rank/world_size default to the RANK/WORLD_SIZE environment (torchrun) and then to a
    single process; init_method defaults to env:// when MASTER_ADDR is set, otherwise to a
    free port on 127.0.0.1. backend defaults to nccl with CUDA and gloo without.
    """
    global _owns_process_group
    if dist.is_initialized():
        return
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if init_method is None:
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init_method = "env://"
        elif world_size == 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            raise ValueError(
                f"world_size={world_size} needs MASTER_ADDR and MASTER_PORT in the environment "
                "or an explicit init_method"
            )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _owns_process_group = True


def initialize_model_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    **process_group_kwargs,
) -> None:
    """Set up tensor/pipeline/context parallel groups and seed the model-parallel RNG.

    Creates the default process group if needed (see `init_process_group`, which takes
    `process_group_kwargs`), calls megatron-core's `initialize_model_parallel`, and seeds
    the RNG tracker so TP ranks draw different dropout masks and shards. Data parallel
    size is world_size / (tp * pp * cp).
    """
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cpu_compat.apply()
    init_process_group(**process_group_kwargs)
    timeout_minutes = process_group_kwargs.get("timeout_s", 600.0) / 60  # the subgroups wait as long
    world_size = dist.get_world_size()
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel(destroy_process_group: bool = True) -> None:
    """Undo `initialize_model_parallel`; also the process group if this module created it."""
    global _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if destroy_process_group and _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_process_group = False
