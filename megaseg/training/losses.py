"""The one loss reduction of every step engine and every evaluation (docs/semantics.md §5).

An engine adds, per micro-batch and per segment, the summed NLL of the labelled tokens it
measured and their count to a `LossReducer`; `reduce` sums them over every rank that holds
a part of the global batch (data-parallel ranks, context-parallel ranks, and the pipeline
group, where only the last stage measures) in one float64 all-reduce. The step loss is the
mean NLL over the predicted tokens of the global batch, whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megaseg.training.batches import all_reduce_sum, compute_device, context_parallel_size


@dataclass
class StepResult:
    """What one forward/backward (or one evaluation) measured, summed over all ranks."""

    loss_sum: float  # summed NLL of the predicted tokens
    predicted: int  # predicted (labelled) tokens
    segment_sums: list[float] = field(default_factory=list)  # summed NLL per segment index
    segment_counts: list[float] = field(default_factory=list)  # labelled tokens per segment index
    tokens: int = 0  # tokens processed
    segment_stats: object = None  # megaseg.ops.stats.SegmentStats of this rank's first micro-batch, when recorded

    @property
    def loss(self) -> float:
        """Mean NLL over the predicted tokens."""
        return self.loss_sum / max(self.predicted, 1)

    @property
    def segment_losses(self) -> list[float]:
        return [s / max(c, 1) for s, c in zip(self.segment_sums, self.segment_counts)]


def num_segments(cfg) -> int:
    return -(-cfg.seq_length // cfg.segment_length)


def global_predicted(microbatches) -> int:
    """Labelled tokens of the global batch. Every context-parallel rank holds the whole
    micro-batches of its data-parallel rank, so each counts a 1/CP share."""
    local = sum(int((labels != -100).sum()) for _, labels in microbatches) / context_parallel_size()
    return round(all_reduce_sum([local])[0])


class LossReducer:
    """Per-segment NLL sums and labelled-token counts of this rank, reduced once."""

    def __init__(self, n_segments: int):
        self.sums = [0.0] * n_segments
        self.counts = [0.0] * n_segments
        self.tokens = 0

    def add(self, segment: int, loss_sum: float, count: int) -> None:
        self.sums[segment] += float(loss_sum)
        self.counts[segment] += count

    def add_lists(self, sums, counts) -> None:
        """Lists over every segment index of the sequence (zeros where this rank has none)."""
        for i, (s, c) in enumerate(zip(sums, counts)):
            self.add(i, s, c)

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    def reduce(self, predicted: int | None = None, segment_stats=None) -> StepResult:
        """Sum over all ranks. ``predicted`` (known before the step, for the loss scale)
        defaults to the reduced token count."""
        n = len(self.sums)
        values = [*self.sums, *self.counts, float(self.tokens)]
        values = all_reduce_sum(_over_pipeline(values))
        sums, counts, tokens = values[:n], values[n : 2 * n], int(values[-1])
        return StepResult(loss_sum=sum(sums), predicted=round(sum(counts)) if predicted is None else predicted,
                          segment_sums=sums, segment_counts=counts, tokens=tokens, segment_stats=segment_stats)


def _over_pipeline(values: list[float]) -> list[float]:
    """Sum over the pipeline group (only the last stage measures a loss); unchanged without stages."""
    if not dist.is_initialized():
        return values
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return t.tolist()
