"""Split a model's KV groups: each KV head copied into ``factor`` new groups.

A grouped-query model with G KV groups shares each K/V head among num_heads / G query
heads. Splitting every group into ``factor`` copies (G' = G x factor groups, each read by
num_heads / G' query heads) keeps every query head reading exactly the keys and values it
read before, so the split model computes the same function under full attention and for
every `local` or `segment` group. What changes is the head plan's grain: each copy has its
own mode, so one copy of a group can keep a retrieval pool while the others keep only the
carried tail (docs/semantics.md §2). A `retrieval` copy selects its prefix with the summed
scores of *its* query heads only, so a retrieval group does not select as the unsplit group
did: continued pretraining under the new plan is what makes the split model use it.

The full-attention KV state of the split model is ``factor`` times the original's (every
copy is cached); a megaseg plan with one retrieval copy keeps the same pool as the
original's one retrieval group, and ``factor`` times as many tails.
"""
from __future__ import annotations

from typing import Mapping

import torch

from megaseg.checkpoint.errors import CheckpointError
from megaseg.config import ConfigError, HeadPlan, ModelConfig

KV_WEIGHTS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def inherited_plan(plan: HeadPlan, factor: int, retrieval_copies: int | None = None) -> HeadPlan:
    """Every copy of a group in the mode of the group it was copied from; with
    ``retrieval_copies`` only the last that many copies of a `retrieval` group stay
    `retrieval`, the others become `local`."""
    keep = factor if retrieval_copies is None else retrieval_copies
    if not isinstance(keep, int) or not 1 <= keep <= factor:
        raise ConfigError(f"retrieval_copies={retrieval_copies!r} is invalid: must be 1..{factor} "
                          f"(the copies of each group)")
    return HeadPlan(tuple(tuple("local" if m == "retrieval" and c < factor - keep else m
                                for m in layer for c in range(factor)) for layer in plan.modes))


def split_kv_groups(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, kv_groups: int,
                    head_plan: HeadPlan | None = None,
                    retrieval_copies: int | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict, config) of the model with ``kv_groups`` KV groups per layer.

    ``kv_groups`` must be a multiple of ``cfg.num_kv_heads`` that divides ``cfg.num_heads``.
    ``head_plan`` (``kv_groups`` groups per layer) replaces the inherited one, where every copy
    keeps the mode of its source group (only the last ``retrieval_copies`` copies of a
    retrieval group, when given).
    """
    groups = cfg.num_kv_heads
    if not isinstance(kv_groups, int) or kv_groups < groups or kv_groups % groups:
        raise ConfigError(f"kv_groups={kv_groups!r} is invalid: must be a multiple of the model's "
                          f"{groups} KV groups (splitting only; merging groups changes the model)")
    if cfg.num_heads % kv_groups:
        raise ConfigError(f"kv_groups={kv_groups} is invalid: must divide num_heads ({cfg.num_heads}), "
                          "so every group is read by the same number of query heads")
    factor = kv_groups // groups
    if head_plan is not None and retrieval_copies is not None:
        raise ConfigError("head_plan and retrieval_copies are exclusive: a plan names every group's mode")
    plan = head_plan if head_plan is not None else inherited_plan(cfg.head_plan, factor, retrieval_copies)
    new_cfg = cfg.replace(num_kv_heads=kv_groups, head_plan=plan)
    out: dict[str, torch.Tensor] = {}
    for name, w in state_dict.items():
        if name.endswith(KV_WEIGHTS):
            if w.shape[0] != groups * cfg.head_dim:
                raise CheckpointError(f"{name}: {tuple(w.shape)} does not hold {groups} KV heads of {cfg.head_dim}")
            w = w.reshape(groups, cfg.head_dim, *w.shape[1:]).repeat_interleave(factor, dim=0)
            w = w.reshape(kv_groups * cfg.head_dim, *w.shape[2:]).contiguous()
        out[name] = w
    return out, new_cfg


def plan_share(plan: HeadPlan) -> str:
    """'1 of 8' (layer, KV group) pairs that keep a retrieval pool."""
    total = plan.num_layers * plan.num_kv_groups
    return f"{plan.count('retrieval')} of {total}"
