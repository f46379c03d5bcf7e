"""Run megatron-core 0.16.1 on a CPU-only torch with the gloo backend.

megatron-core assumes CUDA throughout: `torch.cuda.current_device()` and `device="cuda"`
in buffers, schedules, optimizer, grad clipping, grad scaler and DDP; the CUDA RNG
tracker for tensor-parallel seeds; `Tensor.cuda()` when tying embeddings across
pipeline stages; `torch.cuda.synchronize()` and `ShardedTensor.init_data("cuda")` in
dist_checkpointing; `'torch.cuda.FloatTensor'` type checks in grad clipping and the
distributed optimizer; torch's own Adam (no Apex or Transformer Engine, as on every CPU)
keeps a per-parameter `step` the distributed optimizer's checkpoint loader does not expect.

`apply()` handles them in three ways, narrowest first:

1. Every `megatron.core` module that refers to the global name `torch` (loaded now or
   imported later) gets a stand-in (`_CpuTorch`) that forwards everything to torch
   except that `torch.cuda` answers for the CPU (`current_device()` is the CPU device,
   `synchronize()` does nothing, the RNG calls act on the CPU generator) and tensor
   factories map a CUDA device to the CPU. Nothing outside megatron-core sees it.
2. The CUDA RNG state getters/setters become CPU generator getters/setters, so the RNG
   tracker forks the CPU generator: tensor-parallel ranks draw different dropout masks
   and initial shards, exactly as they draw from different CUDA generators on GPU.
3. The few functions that call `Tensor.cuda()` or compare type strings are recompiled
   from their own source with those calls replaced; every expected source fragment must
   be found, so a different megatron-core fails loudly instead of silently.

`apply()` is idempotent and does nothing at all when CUDA is available.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import sys
import textwrap
import types

import torch

SUPPORTED_MEGATRON_CORE = "0.16.1"


class CpuCompatError(RuntimeError):
    """megatron-core is not the version whose internals this layer patches."""


# Modules whose code runs during model construction, forward/backward, pipeline
# schedules, optimizer steps and dist_checkpointing save/load. Imported up front so
# that the `torch` stand-in is installed before any of their functions runs.
_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

# (module, qualified function name, [(exact source fragment, replacement), ...])
_SOURCE_EDITS = (
    (
        # On CPU the tracked states and the "CPU RNG" are one generator, so the fork itself
        # changes it; megatron's warning about that would fire on every fork.
        "megatron.core.tensor_parallel.random",
        "CudaRNGStatesTracker.fork",
        [("if not torch.all(cpu_rng_state == torch.get_rng_state()).item():", "if False:")],
    ),
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        [("weight.data = weight.data.cuda()", "weight.data = weight.data.cpu()")],
    ),
    (
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        [("param.grad.type() == 'torch.cuda.FloatTensor'", "param.grad.type() == 'torch.FloatTensor'")],
    ),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.__init__",
        [
            (
                "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                "param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']",
            ),
            ("param.type() == 'torch.cuda.FloatTensor'", "param.type() == 'torch.FloatTensor'"),
        ],
    ),
    (
        # The distributed optimizer sorts parameters into fp32 / 16-bit groups by CUDA type name.
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
        [
            (
                "model_param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                "model_param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']",
            ),
            ("model_param.type() == 'torch.cuda.FloatTensor'", "model_param.type() == 'torch.FloatTensor'"),
        ],
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.__init__",
        [
            (
                "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                "param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']",
            ),
        ],
    ),
    (
        # Saving distributed optimizer state in the fully reshardable format gathers the shards.
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.get_parameter_state_dp_zero",
        [("send_tensor = send_tensor.cuda()", "send_tensor = send_tensor.cpu()")],
    ),
    (
        # torch's own Adam (no Apex/Transformer Engine, as on CPU) keeps a per-parameter `step`,
        # which the loaded state lacks: load_state_dict restores it from the param groups.
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        [(
            "dst_tensors[key].copy_(tensors[key])",
            "dst_tensors[key].copy_(tensors[key]) if key != 'step' or key in tensors else None",
        )],
    ),
    (
        "megatron.core.optimizer.grad_scaler",
        "DynamicGradScaler.load_state_dict",
        [("state_dict['scale'].cuda(torch.cuda.current_device())", "state_dict['scale'].cpu()")],
    ),
    (
        "megatron.core.tensor_parallel.data",
        "broadcast_data",
        [("data[key].cuda()", "data[key].cpu()")],
    ),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        "_get_empty_tensor_for_exchange",
        [('init_data("cuda")', 'init_data("cpu")')],
    ),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        "exchange_loaded_tensors_gather_rounds",
        [("all_loaded_tensors[shard_id].cuda()", "all_loaded_tensors[shard_id].cpu()")],
    ),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        "exchange_loaded_tensors_broadcast",
        [("all_loaded_tensors[shard_id].cuda()", "all_loaded_tensors[shard_id].cpu()")],
    ),
)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace",
    "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand_like", "randn_like", "empty_strided",
)  # fmt: skip

_applied = False


def _cpu_device(device):
    """Map a CUDA device spec (str, int index, torch.device) to the CPU; keep others."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        # pinned host memory needs an accelerator; on a CPU-only build it is meaningless
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen from megatron-core on a CPU-only build."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: torch.device("cpu")
        self.synchronize = lambda device=None: None
        self.empty_cache = lambda: None
        self.manual_seed = torch.manual_seed
        self.manual_seed_all = torch.manual_seed
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """`torch` as seen from megatron-core on a CPU-only build."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

        def autocast(device_type="cuda", *args, **kwargs):
            return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

        self.autocast = autocast

    def __getattr__(self, name):
        return getattr(torch, name)


def _install_cpu_torch(module, cpu_torch):
    if vars(module).get("torch") is torch:
        module.torch = cpu_torch


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Gives megatron-core modules imported after `apply()` the same `torch` stand-in."""

    def __init__(self, cpu_torch):
        self.cpu_torch = cpu_torch

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        cpu_torch = self.cpu_torch

        def exec_then_install(module):
            exec_module(module)
            _install_cpu_torch(module, cpu_torch)

        loader.exec_module = exec_then_install
        return spec


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    """CPU stand-in for random._get_cuda_rng_state: the state of the CPU generator."""
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    """CPU stand-in for random._set_cuda_rng_state: restore the CPU generator."""
    torch.set_rng_state(new_state)


def _resolve(module, qualname):
    owner = module
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _recompile(module_name, qualname, edits):
    """Recompile one function from its source with exact-fragment edits applied.

    Line numbers and file name are those of the original, so tracebacks point at the
    megatron-core source. A method using zero-argument `super()` gets its `__class__`
    cell from the enclosing factory function.
    """
    module = sys.modules[module_name]
    owner, name = _resolve(module, qualname)
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    original = inspect.unwrap(current)
    free = set(original.__code__.co_freevars) - {"__class__"}
    if free:
        raise CpuCompatError(f"{module_name}.{qualname} closes over {sorted(free)}; cannot recompile it")
    lines, first_line = inspect.getsourcelines(original)  # from the first decorator (@classmethod)
    source = textwrap.dedent("".join(lines))
    for old, new in edits:
        if old not in source:
            raise CpuCompatError(
                f"{module_name}.{qualname} no longer contains {old!r}; megatron-core "
                f"{SUPPORTED_MEGATRON_CORE} is required"
            )
        source = source.replace(old, new)
    factory_source = (
        "\n" * max(first_line - 2, 0)
        + "def _megaseg_factory(__class__):\n"
        + textwrap.indent(source, "    ")
        + f"    return {name}\n"
    )
    code = compile(factory_source, inspect.getsourcefile(original), "exec")
    namespace = {}
    exec(code, module.__dict__, namespace)
    replacement = namespace["_megaseg_factory"](owner if isinstance(owner, type) else None)
    inspect.unwrap(replacement).__qualname__ = original.__qualname__  # a classmethod stays one
    setattr(owner, name, replacement)
    return current, replacement


def _replace_references(original, replacement):
    """Point every megatron-core module-level name bound to `original` at `replacement`."""
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("megatron.core"):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


def is_applied() -> bool:
    """Whether `apply()` has patched megatron-core in this process."""
    return _applied


def apply() -> bool:
    """Patch megatron-core 0.16.1 to run on a CPU-only torch; a no-op when CUDA exists.

    Returns True when patches are in place after the call, False when CUDA is available
    and nothing was touched. Safe to call any number of times.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    import megatron.core

    version = getattr(megatron.core, "__version__", None)
    if version != SUPPORTED_MEGATRON_CORE:
        raise CpuCompatError(
            f"megaseg's CPU compatibility layer patches megatron-core {SUPPORTED_MEGATRON_CORE} "
            f"internals, found {version}; install megatron-core=={SUPPORTED_MEGATRON_CORE}"
        )
    if _applied:
        return True

    for module_name in _MODULES:
        importlib.import_module(module_name)

    cpu_torch = _CpuTorch()
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.startswith("megatron.core"):
            _install_cpu_torch(module, cpu_torch)
    sys.meta_path.insert(0, _InstallOnImport(cpu_torch))

    from megatron.core.tensor_parallel import random as mp_random

    _replace_references(mp_random._get_cuda_rng_state, _get_rng_state)
    _replace_references(mp_random._set_cuda_rng_state, _set_rng_state)

    for module_name, qualname, edits in _SOURCE_EDITS:
        original, replacement = _recompile(module_name, qualname, edits)
        if "." not in qualname:
            _replace_references(original, replacement)

    _applied = True
    return True
