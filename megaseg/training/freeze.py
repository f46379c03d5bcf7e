"""Frozen rows: the query and key projections of the retrieval KV groups, kept at their initial values.

Retrieval is forward-only (docs/semantics.md §4): the score that selects a retrieval head's
prefix, the segment-end query against every pooled key, never receives a gradient. What
trains the same query and key projections is the head's attention inside the segment, and
Adam moves every weight that gets any gradient by about the learning rate per step. In
continued pretraining of a model that already finds its needles under full attention, that
drift can cost the selection it had (docs/benchmarks/recall.md). ``--freeze-retrieval-qk``
keeps those rows at the values the run started from (the pretrained weights, or the
checkpoint a run resumes from): their gradients are zeroed before the optimizer step, so
they count in neither the grad norm nor Adam's moments, and their values are written back
after it, which undoes the decoupled weight decay. Everything else trains, the value
projections of those groups included.

megatron-core's fused ``linear_qkv`` holds, per KV group of this tensor-parallel rank,
the group's query heads, then its key, then its value rows (``hpg * D``, ``D``, ``D``).
"""
from __future__ import annotations

import torch

from megaseg.config import RETRIEVAL, ConfigError


def qk_rows(modes: tuple[str, ...], heads_per_group: int, head_dim: int) -> list[int]:
    """Rows of a rank's ``linear_qkv`` weight (and bias) that hold the query and key
    projections of the groups in ``modes`` (this rank's KV groups, in order) that retrieve."""
    per_group = (heads_per_group + 2) * head_dim
    rows: list[int] = []
    for j, mode in enumerate(modes):
        if mode == RETRIEVAL:
            rows.extend(range(j * per_group, j * per_group + (heads_per_group + 1) * head_dim))
    return rows


class FrozenRows:
    """The frozen rows of one model (this rank's layers and KV groups) and their values."""

    def __init__(self, model, model_config):
        from megaseg.megatron.model import unwrap_model

        if not model_config.head_plan.has_retrieval():
            raise ConfigError("freeze_retrieval_qk=True is invalid: the head plan has no retrieval KV group, so there "
                              "is nothing to freeze")
        hpg, D = model_config.heads_per_group, model_config.head_dim
        self.entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self.described: list[str] = []
        for layer in unwrap_model(model).decoder.layers:
            core = layer.self_attention.core_attention
            modes = model_config.head_plan.slice_groups(*core.kv_groups).layer(core.layer_index)
            rows = qk_rows(modes, hpg, D)
            if not rows:
                continue
            index = torch.tensor(rows, dtype=torch.long)
            qkv = layer.self_attention.linear_qkv
            for param in (qkv.weight, getattr(qkv, "bias", None)):
                if isinstance(param, torch.nn.Parameter):
                    self.entries.append((param, index.to(param.device), param.detach()[index].clone()))
            groups = [core.kv_groups[0] + j for j, m in enumerate(modes) if m == RETRIEVAL]
            self.described.append(f"layer {core.layer_index} group(s) {', '.join(map(str, groups))}")

    @property
    def numel(self) -> int:
        return sum(values.numel() for _, _, values in self.entries)

    def describe(self) -> str:
        where = "; ".join(self.described) or "none on this rank"
        return f"frozen: query/key projections of the retrieval KV groups ({where}), {self.numel} weights"

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Before the optimizer step: no gradient on the frozen rows (megatron's main_grad)."""
        for param, index, _ in self.entries:
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grad.index_fill_(0, index, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step: the frozen rows hold their initial values again."""
        for param, index, values in self.entries:
            param.data.index_copy_(0, index, values)
