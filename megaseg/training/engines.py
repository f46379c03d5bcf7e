"""Step engines: how one optimizer step's forward and backward run, chosen once at setup.

    engine = select_engine(cfg, model, bf16)     # from the layout, never inside a step
    metrics = train_step(engine, optimizer, scheduler, microbatches)

=====================  ======================================================  ==================
engine                 runs                                                    segment statistics
=====================  ======================================================  ==================
`SequentialEngine`     TBPTT-K segment by segment on this rank (tbptt.py)      recorded
`ChunkEngine`          this rank's chunk of segments, tails point-to-point     not recorded
                       (context parallelism, or tbptt_k = -1; chunk.py)
`PipelineEngine`       windows of K + 1 segments on megatron's 1F1B schedule   not recorded
                       (pipeline.py)
`DeepSpeedEngine`      another engine's forward/backward; DeepSpeed reduces    as the inner engine
                       the gradients and steps (deepspeed_backend.py)
=====================  ======================================================  ==================

Every engine returns one `megaseg.training.losses.StepResult` built by the one
`LossReducer`, and reduces gradients its own way (`reduce_gradients`); `train_step` is the
same for all.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megaseg.ops import stats
from megaseg.training.batches import compute_device, context_parallel_size, data_parallel_size, rank_microbatches
from megaseg.training.losses import LossReducer, StepResult, global_predicted, num_segments
from megaseg.training.precision import autocast_context
from megaseg.training.tbptt import sum_cross_entropy, tbptt_backward


class StepEngine:
    """Forward and backward of this rank's micro-batches of one global batch.

    ``model`` is what the optimizer updates (megatron DDP, or DeepSpeed's wrapper); ``net``
    is what a forward calls (default: ``model``).
    """

    name = "engine"
    supports_segment_stats = False
    frozen = None  # megaseg.training.freeze.FrozenRows with --freeze-retrieval-qk / --freeze-params

    def __init__(self, model, cfg, bf16: bool, net=None):
        self.model, self.cfg, self.bf16 = model, cfg, bf16
        self.net = model if net is None else net
        self.n_segments = num_segments(cfg)

    def forward_backward(self, microbatches, record_stats: bool = False) -> StepResult:
        """Gradients of the global-batch mean NLL under TBPTT-K accumulate in the model's
        grad buffers; the result is summed over all ranks."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, dataset) -> StepResult:
        """Mean NLL (and per segment) over the first eval_iters global batches of ``dataset``:
        always the same samples, so validation losses compare across the run."""
        cfg = self.cfg
        reducer = LossReducer(self.n_segments)
        self.model.eval()
        try:
            for it in range(cfg.eval_iters):
                self._evaluate_batches(rank_microbatches(dataset, it * cfg.global_batch_size, cfg), reducer)
        finally:
            self.model.train()
        return reducer.reduce()

    def _evaluate_batches(self, microbatches, reducer: LossReducer) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()

    def reduce_gradients(self, loss_finite: bool) -> bool:
        """Reduce this step's gradients over the data-parallel ranks (megatron DDP: one
        all-reduce or reduce-scatter of the grad buffers); whether the loss and every
        gradient on every rank are finite."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.model])
        return loss_finite and grads_finite(self.model)

    def loss_scale(self) -> float:
        """DDP divides gradients by the data x context-parallel size; scaling the loss by it
        makes the reduced gradient that of the global token mean."""
        return float(data_parallel_size() * context_parallel_size())


class SequentialEngine(StepEngine):
    """TBPTT-K segment by segment (`megaseg.training.tbptt.tbptt_backward`) over the whole
    model on this rank. ``segment_forward(net, ids_BL, states) -> (logits_BLV, states)``
    defaults to `megaseg.megatron.model.segment_forward`."""

    name = "sequential"
    supports_segment_stats = True

    def __init__(self, model, cfg, bf16: bool, net=None, segment_forward=None):
        super().__init__(model, cfg, bf16, net)
        if segment_forward is None:
            from megaseg.megatron.model import segment_forward
        self.segment_forward = segment_forward

    def _forward(self, ids_BL, states):
        return self.segment_forward(self.net, ids_BL, states)

    def forward_backward(self, microbatches, record_stats: bool = False) -> StepResult:
        cfg = self.cfg
        predicted = global_predicted(microbatches)
        reducer = LossReducer(self.n_segments)
        recorded = None
        for m, (tokens_BT, labels_BT) in enumerate(microbatches):
            recording = stats.recording() if record_stats and m == 0 else contextlib.nullcontext()
            with autocast_context(self.bf16), recording as rec:
                recorded = rec if rec is not None else recorded
                result = tbptt_backward(self._forward, tokens_BT, cfg.segment_length, cfg.tbptt_k, labels_BT=labels_BT,
                                        loss_scale=self.loss_scale(), num_predicted=predicted)
            reducer.add_lists(result.segment_sums, result.segment_tokens)
            reducer.add_tokens(result.tokens)
        return reducer.reduce(predicted, segment_stats=recorded)

    def _evaluate_batches(self, microbatches, reducer: LossReducer) -> None:
        """Segments run one call each with the carried state (segmented execution gives the
        training forward's logits under any split into calls): memory of one segment."""
        S = self.cfg.segment_length
        for tokens_BT, labels_BT in microbatches:
            states = None
            for i in range(self.n_segments):
                with autocast_context(self.bf16):
                    logits_BLV, states = self._forward(tokens_BT[:, i * S : (i + 1) * S], states)
                labels_BL = labels_BT[:, i * S : (i + 1) * S]
                reducer.add(i, float(sum_cross_entropy(logits_BLV, labels_BL)), int((labels_BL != -100).sum()))


class DeepSpeedEngine(StepEngine):
    """Another engine's forward and backward on DeepSpeed's module; DeepSpeed checks the
    local gradients, reduces them once, and its optimizer steps."""

    name = "deepspeed"

    def __init__(self, inner: StepEngine):
        super().__init__(inner.model, inner.cfg, inner.bf16, inner.net)
        self.inner = inner
        self.supports_segment_stats = inner.supports_segment_stats

    def forward_backward(self, microbatches, record_stats: bool = False) -> StepResult:
        return self.inner.forward_backward(microbatches, record_stats)

    def evaluate(self, dataset) -> StepResult:
        return self.inner.evaluate(dataset)

    def reduce_gradients(self, loss_finite: bool) -> bool:
        finite = loss_finite and grads_finite(self.model)
        if finite:
            self.model.reduce_gradients()
        else:
            self.model.zero_grad_buffer()
        return finite


def select_engine(cfg, model, bf16: bool, segment_forward=None) -> StepEngine:
    """The engine of this layout: pipeline stages → `PipelineEngine`; context parallelism or
    the untruncated gradient → `ChunkEngine`; otherwise `SequentialEngine`; wrapped in
    `DeepSpeedEngine` with ``cfg.deepspeed``."""
    from megaseg.training.chunk import ChunkEngine
    from megaseg.training.pipeline import PipelineEngine, pipeline_size

    net = model.module if cfg.deepspeed else model
    if pipeline_size() > 1:
        engine = PipelineEngine(model, cfg, bf16)
    elif context_parallel_size() > 1 or cfg.tbptt_k < 0:
        engine = ChunkEngine(model, cfg, bf16, net)
    else:
        engine = SequentialEngine(model, cfg, bf16, net, segment_forward=segment_forward)
    if cfg.freeze_retrieval_qk or cfg.freeze_params:
        from megaseg.training.freeze import FrozenRows

        engine.frozen = FrozenRows(model, cfg.model_config(cfg.vocab_size or 32), cfg.freeze_retrieval_qk,
                                   cfg.freeze_params)
    return DeepSpeedEngine(engine) if cfg.deepspeed else engine


# ---- one optimizer step ---------------------------------------------------------------------------
def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


@dataclass
class StepMetrics:
    loss: float  # mean NLL over the global batch
    segment_losses: list[float] = field(default_factory=list)
    grad_norm: float | None = None
    lr: float = 0.0
    tokens: int = 0  # tokens processed on all ranks
    update_successful: bool = True
    segment_stats: object = None  # megaseg.ops.stats.SegmentStats of this rank's first micro-batch, when asked


def train_step(engine: StepEngine, optimizer, scheduler, microbatches, record_stats: bool = False) -> StepMetrics:
    """One optimizer step over this rank's micro-batches of a global batch. A non-finite loss
    or gradient on any rank skips the update on every rank (the batch counts as consumed)."""
    engine.zero_grad()
    optimizer.zero_grad()
    result = engine.forward_backward(microbatches, record_stats=record_stats and engine.supports_segment_stats)
    lr = current_lr(optimizer)  # the rate this step applies (the scheduler then moves on)
    frozen = engine.frozen
    if engine.reduce_gradients(math.isfinite(result.loss_sum)):
        if frozen is not None:
            frozen.zero_grads()
        update_successful, grad_norm, _ = optimizer.step()
        if frozen is not None:
            frozen.restore()
    else:
        update_successful, grad_norm = False, None
    if update_successful:
        scheduler.step(increment=engine.cfg.global_batch_size)
    return StepMetrics(
        loss=result.loss,
        segment_losses=result.segment_losses,
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        tokens=result.tokens,
        update_successful=bool(update_successful),
        segment_stats=result.segment_stats,
    )


@torch.no_grad()
def grads_finite(model) -> bool:
    """Every gradient of every rank is finite (one flag, all-reduced over all ranks)."""
    buffers = list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))
    if hasattr(model, "grads_finite"):
        ok = model.grads_finite()
    elif buffers:
        ok = all(bool(torch.isfinite(b.grad_data).all()) for b in buffers)
    else:
        ok = all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters() if hasattr(p, "main_grad"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok
