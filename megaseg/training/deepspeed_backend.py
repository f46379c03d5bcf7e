"""DeepSpeed ZeRO stage 1/2 (optionally with optimizer offload to CPU) under the TBPTT engine.

    --deepspeed --deepspeed-config ds.json

The model is megaseg's megatron-core GPTModel, not wrapped in megatron's DDP; DeepSpeed's
ZeRO optimizer owns the fp32 partitions and the Adam state, 1/DP of each per rank.

One reduction per step. DeepSpeed reduces a gradient in a hook each time autograd
accumulates it (stage 2, or stage 1 with contiguous gradients or overlap_comm); the TBPTT
engine backpropagates into the same parameters several times per micro-batch, which those
hooks refuse ("gradient computed twice"). The hooks are therefore removed: every backward
call only accumulates into ``param.grad``, and at the end of the step
`reduce_gradients()` reduce-scatters (stage 2) or reduces (stage 1) each gradient once,
then `step()` clips the global norm and updates the partitions. ZeRO-2 thus keeps the full
gradients until the step, as megatron's buffers do; its saving is the sharded Adam state
and fp32 copies (and with offload, the update runs on the CPU).

Checkpoints go through megaseg's dist_checkpointing format: the model and the full
(gathered) Adam moments and fp32 weights per parameter, in the same model-space keys the
megatron optimizers use, so they reload at any data-parallel size.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from megaseg.config import ConfigError

INSTALL_HINT = "deepspeed is not installed: pip install 'megaseg[deepspeed]' (or pip install deepspeed==0.19.8)"


def import_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"deepspeed=True is invalid: {INSTALL_HINT}") from None
    return deepspeed


def _get(d: dict, path: str, default=None):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _on(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def deepspeed_config(cfg, dp: int) -> dict:
    """The DeepSpeed config of ``cfg.deepspeed_config``, checked against the Megatron flags.

    Batch sizes, precision, clipping and the ZeRO stage must agree with the flags (a key
    set to "auto" or left out takes the flag's value); a contradiction is a ConfigError
    naming both values.
    """
    path = cfg.deepspeed_config
    if not path:
        raise ConfigError("deepspeed_config=None is invalid: --deepspeed needs --deepspeed-config ds.json")
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"deepspeed_config={path!r} is invalid: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"deepspeed_config={path!r} is invalid: not JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config={path!r} is invalid: must be a JSON object")
    accum = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    wanted = {
        "train_batch_size": ("global_batch_size", cfg.global_batch_size),
        "train_micro_batch_size_per_gpu": ("micro_batch_size", cfg.micro_batch_size),
        "gradient_accumulation_steps": ("global_batch_size / (micro_batch_size x data-parallel size)", accum),
        "gradient_clipping": ("clip_grad", cfg.clip_grad),
    }
    for key, (flag, value) in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{path}: {key}={given!r} contradicts {flag}={value!r}")
        ds[key] = value
    bf16 = bool(cfg.bf16)
    ds_bf16 = _on(_get(ds, "bf16.enabled", False))
    if _on(_get(ds, "fp16.enabled", False)):
        raise ConfigError(f"{path}: fp16.enabled=true contradicts bf16={cfg.bf16!r}: megaseg trains in fp32 or bf16 autocast")
    if ds_bf16 and not bf16:
        raise ConfigError(f"{path}: bf16.enabled=true contradicts bf16={cfg.bf16!r}")
    if ds_bf16:
        raise ConfigError(f"{path}: bf16.enabled=true is invalid: megaseg keeps fp32 weights and runs bf16 under "
                          "autocast (--bf16); leave bf16 out of the DeepSpeed config")
    stage = _get(ds, "zero_optimization.stage", 0)
    if stage not in (1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r} is invalid: megaseg supports ZeRO stage 1 and 2")
    if "optimizer" in ds or "scheduler" in ds:
        key = "optimizer" if "optimizer" in ds else "scheduler"
        raise ConfigError(f"{path}: {key!r} is invalid here: the optimizer and schedule come from the Megatron flags "
                          "(--optimizer, --lr, ...)")
    if cfg.optimizer != "adam":
        raise ConfigError(f"optimizer={cfg.optimizer!r} is invalid with deepspeed=True: use --optimizer adam")
    if cfg.use_distributed_optimizer:
        raise ConfigError("use_distributed_optimizer=True is invalid with deepspeed=True: ZeRO already shards the "
                          "optimizer state; use one of them")
    zero = ds.setdefault("zero_optimization", {})
    # Reduction happens once, at the step (see the module docstring).
    zero["overlap_comm"] = False
    zero["contiguous_gradients"] = False  # its buffer is filled by the removed hooks
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedModel:
    """The GPTModel and its DeepSpeed engine, with the calls `train_step` makes on a model."""

    def __init__(self, engine, gpt):
        self.engine = engine
        self.module = gpt
        zero = engine.optimizer
        for hook in list(getattr(zero, "_grad_acc_hooks", [])):
            hook.remove()
        if hasattr(zero, "_grad_acc_hooks"):
            zero._grad_acc_hooks = []

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True):
        self.module.train(mode)

    def eval(self):
        self.module.eval()

    def sharded_state_dict(self, *args, **kwargs):
        return self.module.sharded_state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load the weights into the model and into ZeRO's fp32 partitions of them."""
        from deepspeed.utils import safe_set_full_fp32_param

        result = self.module.load_state_dict(state_dict, strict=strict)
        for p in self.module.parameters():
            safe_set_full_fp32_param(p, p.detach().float())
        return result

    def zero_grad_buffer(self):
        for p in self.module.parameters():
            p.grad = None

    def grads_finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.module.parameters() if p.grad is not None)

    def reduce_gradients(self):
        """Reduce every accumulated gradient once over the data-parallel group."""
        zero = self.engine.optimizer
        zero.setup_buckets()  # what DeepSpeed's own backward prologue does: the reduction buffers
        zero.reduce_gradients()


class DeepSpeedOptimizer:
    """Step, lr and checkpoint state of the ZeRO optimizer, in the shape the trainer uses."""

    def __init__(self, engine, torch_optimizer):
        self.engine = engine
        self.optimizer = torch_optimizer  # the torch Adam over this rank's fp32 partitions

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        pass  # grads are freed by the reduction; the model clears what is left

    def step(self):
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        return not overflow, (None if norm is None else float(norm)), None

    def allocate_state(self):
        """A fresh ZeRO optimizer has no Adam state to load into: one zero-gradient step makes
        it (every value it changes is then replaced by the load)."""
        if self.optimizer.state:
            return
        for p in self.engine.module.parameters():
            p.grad = torch.zeros_like(p)
        zero = self.engine.optimizer
        zero.setup_buckets()  # what DeepSpeed's own backward prologue does: the reduction buffers
        zero.reduce_gradients()
        self.step()

    # ---- checkpoints: full per-parameter state in model space -----------------------------
    def _step_count(self) -> int:
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _link_state(self):
        """Point every parameter's ZeRO fragment map at the current Adam state tensors."""
        zero = self.engine.optimizer
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if not is_loading:
            self._link_state()

        state = {}
        # One entry per model tensor, in the model's sharded-state-dict order (the load walks
        # the same order); layers stack under one key at different offsets.
        for i, sh in enumerate(_tensors(model_sharded_state_dict)):
            p = sh.data
            if is_loading:
                tensors = {k: torch.empty(p.shape, dtype=torch.float32) for k in ("fp32_param", "exp_avg", "exp_avg_sq")}
            else:
                tensors = {"fp32_param": safe_get_full_fp32_param(p),
                           "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                           "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
            state[i] = {k: _like(sh, f"optimizer.state.{k}.{sh.key}", v.detach().reshape(p.shape))
                        for k, v in tensors.items()}
        return {"deepspeed_state": state, "step": self._step_count(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]}

    def load_state_dict(self, state_dict):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._link_state()
        loaded = state_dict["deepspeed_state"]
        for i, sh in enumerate(_tensors(self.engine.module.sharded_state_dict())):
            p, tensors = sh.data, loaded[i]
            safe_set_full_fp32_param(p, tensors["fp32_param"].reshape(p.shape))
            safe_set_full_optimizer_state(p, tensors["exp_avg"].reshape(p.shape), "exp_avg")
            safe_set_full_optimizer_state(p, tensors["exp_avg_sq"].reshape(p.shape), "exp_avg_sq")
        step = torch.tensor(float(state_dict["step"]))
        for st in self.optimizer.state.values():
            if "step" in st:
                st["step"] = step.clone()


def _tensors(sd):
    """The ShardedTensors and ShardedTensorFactories of a model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(sd)
    return list(nested_values(sharded))


def _like(sh, key, data):
    """``sh`` (a model ShardedTensor or factory) for another tensor of the parameter's shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        return replace(sh, key=key, data=data)
    return replace(sh, key=key, data=data, dtype=data.dtype)


def setup(cfg, gpt, dp: int):
    """(DeepSpeedModel, DeepSpeedOptimizer, torch optimizer) for a built GPTModel."""
    deepspeed = import_deepspeed()
    ds = deepspeed_config(cfg, dp)
    decay, no_decay = [], []
    for name, p in gpt.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [g for g in ({"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
                          {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}) if g["params"]]
    offload = _get(ds, "zero_optimization.offload_optimizer.device", "none") == "cpu"
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        adam = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay, adamw_mode=True)
    else:
        adam = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)
    from megatron.core import parallel_state as ps

    # DeepSpeed insists on LOCAL_RANK (torchrun sets it); processes started otherwise share
    # one machine's process group, so the global rank stands in.
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    engine, _, _, _ = deepspeed.initialize(model=gpt, optimizer=adam, config=ds, dist_init_required=False,
                                           mpu=_Mpu(ps))
    return DeepSpeedModel(engine, gpt), DeepSpeedOptimizer(engine, adam), adam


class _Mpu:
    """megatron's parallel state in the interface DeepSpeed asks of an `mpu`."""

    def __init__(self, ps):
        self.ps = ps

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size() * self.ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_model_parallel_group().rank()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()
