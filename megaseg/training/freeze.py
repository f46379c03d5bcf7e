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

``--freeze-params PATTERN ...`` freezes whole parameters the same way: shell-style
patterns over megatron-core parameter names with global layer numbers (the same name at
every pipeline stage), e.g. ``embedding.*``, ``decoder.layers.0.*``,
``decoder.layers.1.input_layernorm.*``. Frozen together with the retrieval groups' query
and key rows, the embedding, the layers below and the retrieval layer's input norm fix
every input of the selection score.

megatron-core's fused ``linear_qkv`` holds, per KV group of this tensor-parallel rank,
the group's query heads, then its key, then its value rows (``hpg * D``, ``D``, ``D``).
"""
from __future__ import annotations

import fnmatch
import re

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


def global_name(name: str, layer_numbers: list[int]) -> str:
    """A parameter name of this stage with the global layer number (megatron numbers a
    pipeline stage's layers from 0)."""
    name = name.removeprefix("module.")
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    if m is None:
        return name
    return f"decoder.layers.{layer_numbers[int(m.group(1))]}.{name[m.end():]}"


class FrozenRows:
    """The frozen rows of one model (this rank's layers and KV groups) and their values:
    the retrieval groups' query and key rows (``retrieval_qk``) and every row of the
    parameters whose global names match ``patterns``."""

    def __init__(self, model, model_config, retrieval_qk: bool = True, patterns=()):
        from megaseg.megatron.model import layer_indices, unwrap_model

        gpt = unwrap_model(model)
        self.entries: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor]] = []
        self.described: list[str] = []
        if retrieval_qk:
            self._retrieval_qk(gpt, model_config)
        if patterns:
            self._named(gpt, list(patterns), layer_indices(gpt))

    def _retrieval_qk(self, gpt, model_config) -> None:
        if not model_config.head_plan.has_retrieval():
            raise ConfigError("freeze_retrieval_qk=True is invalid: the head plan has no retrieval KV group, so there "
                              "is nothing to freeze")
        hpg, D = model_config.heads_per_group, model_config.head_dim
        for layer in gpt.decoder.layers:
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
            self.described.append(f"layer {core.layer_index} group(s) {', '.join(map(str, groups))} query/key rows")

    def _named(self, gpt, patterns: list[str], layer_numbers: list[int]) -> None:
        from megaseg.training.pipeline import pipeline_size

        matched = {p: 0 for p in patterns}
        for name, param in gpt.named_parameters():
            full = global_name(name, layer_numbers)
            hits = [p for p in patterns if fnmatch.fnmatchcase(full, p)]
            for p in hits:
                matched[p] += 1
            if hits:
                self.entries.append((param, None, param.detach().clone()))
                self.described.append(full)
        missing = [p for p, n in matched.items() if not n]
        if missing and pipeline_size() == 1:  # a stage holds only its layers: checked without pipelining
            raise ConfigError(f"freeze_params={missing} is invalid: no parameter name matches (names look like "
                              "embedding.word_embeddings.weight, decoder.layers.0.self_attention.linear_qkv.weight, "
                              "decoder.layers.1.input_layernorm.weight, output_layer.weight)")

    @property
    def numel(self) -> int:
        return sum(values.numel() for _, _, values in self.entries)

    def describe(self) -> str:
        where = "; ".join(self.described) or "none on this rank"
        return f"frozen: {where} ({self.numel} weights)"

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Before the optimizer step: no gradient on the frozen rows (megatron's main_grad)."""
        for param, index, _ in self.entries:
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            if index is None:
                grad.zero_()
            else:
                grad.index_fill_(0, index, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step: the frozen rows hold their initial values again."""
        for param, index, values in self.entries:
            if index is None:
                param.data.copy_(values)
            else:
                param.data.index_copy_(0, index, values)
