"""The context-parallel step engine: each rank runs its chunk of whole sequences through the
model in one call (megaseg.parallel.context's layout and messages) and backpropagates it
with the exact TBPTT-K gradient rule of `TrainingChunk`.

    layout = ChunkLayout(seq_length=T, segment_length=S, size=P)
    chunk = TrainingChunk.for_this_rank(layout, K)      # after initialize_model_parallel(cp=P)
    logits_BLV = context_parallel_forward(model, ids_BT[:, slice(*chunk.token_range)], chunk)
    chunk.backward(loss(logits_BLV, labels of the chunk))   # the exact TBPTT-K gradient

Exact TBPTT-K (K >= 0): every tail a segment reads is a leaf (the previous rank's last tail
too), so the loss's backward stops at every boundary; then K pushes each send the
cotangents the leaves collected back into the tails they copy (the previous segment's, or
across ranks the previous rank's), so pass d adds exactly the paths that cross d
boundaries — the sequential engine's gradient, from one forward of the chunk. K = -1 is the
untruncated gradient: tails stay attached and their cotangents cross ranks inside the
backward. It is also the engine of tbptt_k = -1 on one rank.
"""
from __future__ import annotations

import torch

from megaseg.config import ConfigError
from megaseg.ops.recompute import recomputing
from megaseg.parallel.context import ChunkLayout, SequenceChunk
from megaseg.training.batches import context_parallel_size
from megaseg.training.engines import StepEngine
from megaseg.training.losses import LossReducer, StepResult, global_predicted
from megaseg.training.precision import autocast_context
from megaseg.training.tbptt import BatchResult


class TrainingChunk(SequenceChunk):
    """A `SequenceChunk` whose call has a gradient: tails become leaves (TBPTT-K) or carry
    their cotangents across ranks (untruncated), and `backward` runs the pushes."""

    def __init__(self, layout: ChunkLayout, rank: int, tbptt_k: int, group=None, ranks: list[int] | None = None):
        if tbptt_k < -1:
            raise ConfigError(f"tbptt_k={tbptt_k} is invalid: must be >= 0, or -1 for the untruncated gradient")
        super().__init__(layout, rank, group=group, ranks=ranks)
        self.tbptt_k = tbptt_k
        self.truncated = tbptt_k >= 0
        # TBPTT-K pushes (truncated, K > 0, with gradient): per layer, the leaves the chunk's
        # segments read as tails and what they copy.
        self._inner: list = []  # (tails inside the chunk, their leaves), k and v
        self._first: dict[int, torch.Tensor] = {}  # layer -> leaf of the previous rank's tail
        self._last: dict[int, torch.Tensor] = {}  # layer -> this chunk's last tail (sent on)
        self._placeholders: list = []  # empty slices: a TP rank whose peers push this layer

    def _pushes(self) -> bool:
        """Whether this call keeps leaves for TBPTT-K pushes (K > 0, gradient enabled)."""
        return self.truncated and self.tbptt_k > 0 and torch.is_grad_enabled()

    def _registers(self) -> bool:
        """Whether leaves and tails are registered for the pushes: in the forward, never in a
        recompute (megaseg.ops.recompute), which builds the same graph for its values only."""
        return self._pushes() and not recomputing()

    def exchange_tail(self, layer: int, my_tail: torch.Tensor | None, anchor: torch.Tensor, shape: tuple):
        """`SequenceChunk.exchange_tail`, with the received tail's gradient: untruncated, its
        cotangent goes back inside the backward; for TBPTT-K it is a leaf whose gradient
        `backward` sends back between pushes."""
        values = super().exchange_tail(layer, my_tail, anchor, shape)
        if values is None:
            return None
        if not self.truncated and torch.is_grad_enabled() and anchor.requires_grad:
            return _TailFromPrevious.apply(self, layer, values, anchor)
        if self._pushes():
            values.requires_grad_(True)
        if self._registers():
            self._first[layer] = values
        return values

    def link_tail(self, layer: int, my_tail: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out``, unchanged; the tail sent to the next rank gets that rank's cotangent: inside
        the backward (untruncated), or in the pushes of `backward` (TBPTT-K)."""
        if self.is_last or not (torch.is_grad_enabled() and out.requires_grad):
            return out
        if not self.truncated:
            return _TailToNext.apply(self, layer, my_tail, out)
        if self._registers():
            self._last[layer] = my_tail
        return out

    def cut_tails(self, layer: int, body_k: torch.Tensor, body_v: torch.Tensor):
        """The tails the chunk's segments read from their previous segments: attached when
        untruncated, detached for K = 0, leaves (pushed by `backward`) for K > 0."""
        if not self.truncated:
            return body_k, body_v
        if not self._pushes():
            return body_k.detach(), body_v.detach()
        leaf_k, leaf_v = body_k.detach().requires_grad_(True), body_v.detach().requires_grad_(True)
        if self._registers():
            self._inner.append((body_k, leaf_k))
            self._inner.append((body_v, leaf_v))
        return leaf_k, leaf_v

    def placeholder(self, layer: int, chunk_tokens: int, empty: torch.Tensor) -> None:
        """A tensor-parallel rank without `local` groups in a layer where its peers have some
        pushes ``empty`` (a zero-size slice of its keys) whenever they push a tail of that
        layer, so every TP rank runs the same collectives in each push."""
        n_seg = -(-chunk_tokens // self.layout.segment_length)
        if self._registers() and (n_seg > 1 or not self.is_last) and empty.requires_grad:
            self._placeholders.append(empty)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` with this chunk's gradient rule, then wait for every message.

        TBPTT-K: the loss's backward stops at every carried tail; push d (d = 1..K) sends each
        leaf's cotangent into the tail it copies — the previous segment's, or the previous
        rank's (point-to-point) — and so adds the paths crossing exactly d boundaries."""
        try:
            pushes = self.tbptt_k if self._pushes() else 0
            loss.backward(retain_graph=pushes > 0)
            for d in range(1, pushes + 1):
                outputs, grads = [], []
                for layer, leaf in sorted(self._first.items()):
                    self._send(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf), self.rank - 1, layer,
                               "tail_grad")
                    leaf.grad = None
                for layer, tail in sorted(self._last.items()):
                    work, got = self._recv(tail.shape, tail.dtype, tail.device, self.rank + 1, layer, "tail_grad")
                    work.wait()
                    outputs.append(tail)
                    grads.append(got)
                # Every registered tail is pushed, with zeros where no path reached its leaf:
                # each tensor-parallel rank then runs the same collectives in every push.
                for tail, leaf in self._inner:
                    outputs.append(tail)
                    grads.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
                    leaf.grad = None
                for empty in self._placeholders:
                    outputs.append(empty)
                    grads.append(torch.zeros_like(empty))
                if outputs:
                    torch.autograd.backward(outputs, grads, retain_graph=d < pushes)
        finally:
            self._inner, self._first, self._last, self._placeholders = [], {}, {}, []
            self.finish()


class _TailFromPrevious(torch.autograd.Function):
    """The previous rank's tail (untruncated gradient); its cotangent goes back to that rank."""

    @staticmethod
    def forward(ctx, chunk: SequenceChunk, layer: int, values: torch.Tensor, anchor: torch.Tensor):
        ctx.chunk, ctx.layer = chunk, layer
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.chunk._send(grad, ctx.chunk.rank - 1, ctx.layer, "tail_grad")
        return None, None, None, None


class _TailToNext(torch.autograd.Function):
    """Identity on the attention output (untruncated gradient); its backward adds the
    cotangent of the tail this rank sent, received from the next rank, to the tail's."""

    @staticmethod
    def forward(ctx, chunk: SequenceChunk, layer: int, my_tail: torch.Tensor, out: torch.Tensor):
        ctx.chunk, ctx.layer = chunk, layer
        ctx.tail_shape, ctx.tail_dtype = my_tail.shape, my_tail.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        chunk = ctx.chunk
        work, got = chunk._recv(ctx.tail_shape, ctx.tail_dtype, grad_out.device, chunk.rank + 1, ctx.layer, "tail_grad")
        work.wait()
        return None, None, got, grad_out


def context_parallel_forward(model, ids_BL: torch.Tensor, chunk: SequenceChunk) -> torch.Tensor:
    """Logits [B, L, V] of this rank's chunk ``ids_BL`` of the sequences; backpropagate a loss
    of them with ``chunk.backward(loss)``."""
    from megatron.core.utils import unwrap_model

    from megaseg.megatron.attention import SegmentStates

    gpt = unwrap_model(model)
    if ids_BL.shape[1] != chunk.stop - chunk.start:
        raise ValueError(f"chunk {chunk.token_range} of the sequence needs {chunk.stop - chunk.start} tokens, "
                         f"got {ids_BL.shape[1]}")
    logits = model(ids_BL, position_ids=None, attention_mask=None, packed_seq_params=SegmentStates(chunk=chunk),
                   runtime_gather_output=True)
    return logits[..., : gpt.megaseg_config.vocab_size]


def recomputes_output_layer(model) -> bool:
    """Full recompute also recomputes the output layer and the loss, one segment at a time
    (`_checkpointed_nll`): otherwise the chunk's logits, their log-softmax and their gradient
    (3 x V floats per token) would be the largest activation left."""
    from megatron.core.utils import unwrap_model

    config = unwrap_model(model).config
    return config.recompute_granularity == "full" and not config.sequence_parallel


def _checkpointed_nll(model, ids_BL: torch.Tensor, labels_BL: torch.Tensor, chunk: SequenceChunk) -> torch.Tensor:
    """Per-token NLL [B, L] of the chunk, keeping for the backward only the final hidden
    states: each segment's logits and cross entropy run through `checkpoint` (recomputed in
    the backward, one segment's logits alive at a time)."""
    from megatron.core.utils import unwrap_model

    from megaseg.megatron.attention import SegmentStates
    from megaseg.ops.recompute import checkpoint

    gpt = unwrap_model(model)
    post_process, gpt.post_process = gpt.post_process, False  # GPTModel returns the hidden states [L, B, E]
    try:
        hidden_LBE = model(ids_BL, position_ids=None, attention_mask=None,
                           packed_seq_params=SegmentStates(chunk=chunk))
    finally:
        gpt.post_process = post_process
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    V = gpt.megaseg_config.vocab_size

    def nll(hidden_lBE, labels_Bl):
        logits_lBV, _ = gpt.output_layer(hidden_lBE, weight=weight, runtime_gather_output=True)
        return _token_nll(logits_lBV[..., :V].transpose(0, 1), labels_Bl)

    S = chunk.layout.segment_length
    first = chunk.start - chunk.start % S  # segment boundaries of the whole sequence
    cuts = [0] + [b - chunk.start for b in range(first + S, chunk.stop, S) if b > chunk.start] + [ids_BL.shape[1]]
    return torch.cat([checkpoint(nll, hidden_LBE[a:b], labels_BL[:, a:b]) for a, b in zip(cuts, cuts[1:])], 1)


def _token_nll(logits_BLV, labels_BL):
    import torch.nn.functional as F

    return F.cross_entropy(logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=-100,
                           reduction="none").view(labels_BL.shape)


def _segment_sums(nll_BL, labels_BL, chunk: SequenceChunk):
    """Summed NLL of the chunk (a tensor) and, per segment of the whole sequence, the NLL sum
    and labelled-token count of this chunk's part (zero elsewhere)."""
    layout, S = chunk.layout, chunk.layout.segment_length
    detached = nll_BL.detach()
    labelled = labels_BL != -100
    sums, counts = [0.0] * layout.num_segments, [0] * layout.num_segments
    first, stop = layout.segment_range(chunk.rank)
    for i in range(first, stop):
        a, b = i * S - chunk.start, min((i + 1) * S, layout.seq_length) - chunk.start
        sums[i] = float(detached[:, a:b].sum())
        counts[i] = int(labelled[:, a:b].sum())
    return nll_BL.sum(), sums, counts


def chunk_backward(model, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor, layout: ChunkLayout, tbptt_k: int,
                   loss_scale: float = 1.0, num_predicted: int | None = None) -> BatchResult:
    """Forward and backward of this rank's chunk of whole sequences; accumulates ``.grad``.

    The same contract as `megaseg.training.tbptt.tbptt_backward`: the loss backpropagated is
    ``loss_scale * (NLL sum of this chunk) / num_predicted``, so with loss_scale = data x
    context-parallel size and the global number of predicted tokens the reduced gradient is
    that of the global token mean. The loss is this chunk's NLL sum / num_predicted; segment
    lists cover every segment of the sequence, with this chunk's part (others 0).
    """
    chunk = TrainingChunk.for_this_rank(layout, tbptt_k)
    a, b = chunk.token_range
    labels = labels_BT[:, a:b]
    denom = max(num_predicted if num_predicted is not None else int((labels != -100).sum()), 1)
    if recomputes_output_layer(model):
        nll = _checkpointed_nll(model, input_ids_BT[:, a:b], labels, chunk)
    else:
        nll = _token_nll(context_parallel_forward(model, input_ids_BT[:, a:b], chunk), labels)
    total, sums, counts = _segment_sums(nll, labels, chunk)
    chunk.backward(total.mul(loss_scale / denom))
    return BatchResult(loss=float(total.detach()) / denom, segment_losses=[s / max(c, 1) for s, c in zip(sums, counts)],
                       segment_tokens=counts, tokens=int(labels.numel()), segment_sums=sums)


@torch.no_grad()
def chunk_losses(model, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor, layout: ChunkLayout):
    """Forward-only: (NLL sum, labelled tokens) per segment of the sequence, this chunk's part."""
    chunk = SequenceChunk.for_this_rank(layout)
    a, b = chunk.token_range
    try:
        labels = labels_BT[:, a:b]
        _, sums, counts = _segment_sums(_token_nll(context_parallel_forward(model, input_ids_BT[:, a:b], chunk),
                                                   labels), labels, chunk)
    finally:
        chunk.finish()
    return sums, counts


class ChunkEngine(StepEngine):
    """Context parallelism over segments (and the untruncated gradient on one rank): each
    micro-batch is one forward of this rank's chunk and one `TrainingChunk.backward`."""

    name = "context-parallel chunk"

    def __init__(self, model, cfg, bf16: bool, net=None):
        super().__init__(model, cfg, bf16, net)
        self.layout = ChunkLayout(cfg.seq_length, cfg.segment_length, context_parallel_size())

    def forward_backward(self, microbatches, record_stats: bool = False) -> StepResult:
        predicted = global_predicted(microbatches)
        reducer = LossReducer(self.n_segments)
        for tokens_BT, labels_BT in microbatches:
            with autocast_context(self.bf16):
                result = chunk_backward(self.net, tokens_BT, labels_BT, self.layout, self.cfg.tbptt_k,
                                        loss_scale=self.loss_scale(), num_predicted=predicted)
            reducer.add_lists(result.segment_sums, result.segment_tokens)
            reducer.add_tokens(result.tokens)
        return reducer.reduce(predicted)

    def _evaluate_batches(self, microbatches, reducer: LossReducer) -> None:
        """Each context-parallel rank runs its chunk, forward only."""
        for tokens_BT, labels_BT in microbatches:
            with autocast_context(self.bf16):
                sums, counts = chunk_losses(self.net, tokens_BT, labels_BT, self.layout)
            reducer.add_lists(sums, counts)
