"""TBPTT-K training step (docs/semantics.md §5): the exact gradient of L_K with O((K+1)·S) activations.

Sequential design. Segment j's graph G_j
starts from a *leaf copy* of the carried tails C_{j-1}, so graphs are disjoint. The loss
l_i is backpropagated through G_i, and the cotangent it leaves on G_i's input tails is
pushed into G_{i-1}, then G_{i-2}, ... for K steps, where it stops (stopgrad C_{i-1-K}).
Each graph is therefore backpropagated K+1 times (once per loss that reaches it) and freed
after the last; at most K+1 graphs are alive at once, whatever the sequence length.

Only the tails carry gradient between segments; the retrieved prefix and the pool are
detached inside the operator.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from megaseg.ops import stats
from megaseg.ops.segmented_attention import LayerState

TAIL_FIELDS = ("tail_k", "tail_v")

# forward_segment(input_ids [B, L], states) -> (logits [B, L, V] or hidden, states)
SegmentForward = Callable[[torch.Tensor, list], tuple[torch.Tensor, list]]


@dataclass
class BatchResult:
    """What the forward/backward of one batch of sequences measured (this rank's part)."""

    loss: float  # summed NLL / num_predicted (docs/semantics.md §5 reduction)
    segment_losses: list[float] = field(default_factory=list)  # mean NLL of each segment's tokens
    segment_tokens: list[int] = field(default_factory=list)  # labelled tokens of each segment
    tokens: int = 0
    segment_sums: list[float] = field(default_factory=list)  # summed NLL of each segment's tokens


def segment_labels(input_ids_BT: torch.Tensor, labels_BT: torch.Tensor | None):
    """Next-token labels [B, T]; the last position has none (-100) unless labels are given."""
    if labels_BT is not None:
        return labels_BT
    labels = torch.full_like(input_ids_BT, -100)
    labels[:, :-1] = input_ids_BT[:, 1:]
    return labels


def _leaf_states(states: list[LayerState] | None, with_grad: bool):
    """Detached copies of the states; tails become leaves that collect their cotangent."""
    if states is None:
        return None, []
    out, leaves = [], []
    for st in states:
        st = st.detached()
        for name in TAIL_FIELDS:
            t = getattr(st, name)
            if t is not None and with_grad:
                t = t.requires_grad_(True)
                leaves.append(t)
            elif t is None and with_grad:
                leaves.append(None)
        out.append(st)
    return out, leaves


def _tail_outputs(states: list[LayerState]):
    return [getattr(st, name) for st in states for name in TAIL_FIELDS]


def tbptt_backward(
    forward_segment: SegmentForward,
    input_ids_BT: torch.Tensor,
    segment_length: int,
    k: int,
    labels_BT: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    num_predicted: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> BatchResult:
    """Run forward and backward of one sequence batch; accumulates parameter ``.grad``.

    The loss backpropagated is ``loss_scale * sum_i l_i / num_predicted`` (default: the
    number of labelled tokens), i.e. the mean NLL. ``loss_fn(output, labels)`` returns the
    summed loss of one segment (default: cross entropy over logits, ignore_index=-100).
    """
    if k < 0:
        raise ValueError(f"tbptt_k={k} must be >= 0 here; the untruncated gradient (-1) is the one-pass "
                         "backward (megaseg.training.chunk.chunk_backward)")
    loss_fn = loss_fn or sum_cross_entropy
    labels_BT = segment_labels(input_ids_BT, labels_BT)
    T = input_ids_BT.shape[1]
    denom = num_predicted if num_predicted is not None else int((labels_BT != -100).sum())
    denom = max(denom, 1)
    result = BatchResult(loss=0.0, tokens=int(input_ids_BT.numel()))
    rec = stats.active()
    if rec is not None:
        rec.tbptt_k = k
    window: deque = deque()  # (input leaves, output tails) of the last K graphs, newest last
    states = None
    total = 0.0
    for start in range(0, T, segment_length):
        stop = min(start + segment_length, T)
        in_states, leaves = _leaf_states(states, with_grad=k > 0)
        out, states = forward_segment(input_ids_BT[:, start:stop], in_states)
        labels = labels_BT[:, start:stop]
        loss_sum = loss_fn(out, labels)
        n_lab = int((labels != -100).sum())
        seg_sum = loss_sum.item()
        result.segment_sums.append(seg_sum)
        result.segment_losses.append(seg_sum / max(n_lab, 1))
        result.segment_tokens.append(n_lab)
        total += seg_sum
        more = k > 0 and stop < T
        loss_sum.mul(loss_scale / denom).backward(retain_graph=more)
        # Push l_i's cotangent back through G_{i-1} .. G_{i-K}.
        _push_cotangents(window, leaves, k, rec)
        if k > 0:
            window.append((leaves, _tail_outputs(states)))
            if len(window) > k:
                window.popleft()
        else:
            states = [st.detached() for st in states]
    result.loss = total / denom
    return result


def _push_cotangents(window: deque, leaves: list, k: int, rec) -> None:
    """Push the cotangent that segment i's loss left on ``leaves`` (G_i's input tails) back
    through G_{i-1} .. G_{i-K}: ``window`` holds their (input leaves, output tails), newest
    last. Each step backpropagates the leaf gradients of the step before from the tails
    those leaves copy, after clearing the input leaves' gradients of the graph it enters (so
    they collect only this loss's cotangent); it stops when no cotangent is left. A graph's
    last use (depth K) frees it. ``rec`` (the active stats recorder, or None) records each
    cotangent by its depth."""
    cot_leaves = leaves
    for depth, (prev_leaves, prev_tails) in enumerate(reversed(window), start=1):
        pairs = [(t, leaf.grad) for t, leaf in zip(prev_tails, cot_leaves)
                 if leaf is not None and leaf.grad is not None and t is not None and t.requires_grad]
        for leaf in prev_leaves:
            if leaf is not None:
                leaf.grad = None
        if not pairs:
            break
        if rec is not None:  # l_i's cotangent crossing `depth` boundaries back
            rec.add_cotangent(depth, [p[1] for p in pairs])
        last_use = depth == k
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs], retain_graph=not last_use)
        cot_leaves = prev_leaves


def sum_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of the labelled positions (-100 is ignored), in fp32: the loss
    the sequential and pipeline engines take per segment."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=-100, reduction="sum")


def full_sequence_loss(model, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor | None = None):
    """One-pass forward loss (mean NLL); its gradient is the K = infinity gradient."""
    logits, _ = model(input_ids_BT)
    labels = segment_labels(input_ids_BT, labels_BT)
    return sum_cross_entropy(logits, labels) / max(int((labels != -100).sum()), 1)
