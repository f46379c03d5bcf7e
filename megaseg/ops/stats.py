"""What segmented execution does inside a run, recorded from the operator's own tensors.

    with recording() as rec:
        tbptt_backward(...)          # or any forward through SegmentedAttention
    rec.summary(grad_norm)           # {"segments/...": value}, histograms

While a recorder is active, every `SegmentedAttention` call reports

* per retrieval (layer, KV group): the positions the top-R picked, as a distance in
  segments back from the retrieving segment, and the score margin between the R-th and
  (R+1)-th candidate (how decisive the choice was);
* per layer and access mode: the attention mass its queries put on the prefix (carried
  tail or retrieved tokens) and on their own segment — computed by the attention kernel
  itself, run once more with indicator values in place of V (channel 0 of every prefix
  value is 1, channel 1 of every segment value is 1), so the two shares are exactly the
  operator's softmax weights summed over each part;

and `tbptt_backward` reports the norm of the tail cotangent it pushes across each segment
boundary, per depth 1..K. Nothing is recorded (and nothing costs anything) without an
active recorder. Layers report with the global layer index and KV group numbers their
owner set on the operator (``layer_index``, ``group_offset``).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
from megaseg.ops.recompute import recomputing

_ACTIVE: "SegmentStats | None" = None


def active() -> "SegmentStats | None":
    """The recorder of the running forward; None inside a recompute (megaseg.ops.recompute),
    whose values the forward has already recorded."""
    return None if recomputing() else _ACTIVE


@contextlib.contextmanager
def recording(keep_picks: bool = False):
    """Record segment statistics of everything run inside the block; with ``keep_picks``
    also every retrieval's picked token positions (`SegmentStats.picks`)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, SegmentStats(keep_picks)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


class SegmentStats:
    def __init__(self, keep_picks: bool = False):
        # (layer, KV group) -> [(segment served [C], picked positions [B, C, R] with -1 for
        # no pick)], one entry per operator call; only with keep_picks.
        self.keep_picks = keep_picks
        self.picks: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.distances: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
        self.margins: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
        self.mass: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # prefix, segment, n
        self.cotangent_sq: dict[int, float] = defaultdict(float)
        self.tbptt_k: int | None = None

    # ---- reported by the operator ---------------------------------------------------------------
    @torch.no_grad()
    def add_retrieval(self, layer: int, groups: list[int], indices_BGCR: torch.Tensor, count_C: torch.Tensor,
                      segment_C: torch.Tensor, margin_BGC: torch.Tensor, segment_length: int) -> None:
        """``segment_C``: index of the segment each boundary's retrieval serves; ``count_C``:
        valid picks per boundary; ``indices``: picked pool (= token) positions."""
        R = indices_BGCR.shape[-1]
        valid_CR = torch.arange(R, device=count_C.device)[None, :] < count_C[:, None]
        dist_BGCR = segment_C[None, None, :, None] - torch.div(indices_BGCR, segment_length, rounding_mode="floor")
        for i, g in enumerate(groups):
            if self.keep_picks:
                picked = indices_BGCR[:, i].masked_fill(~valid_CR.expand_as(indices_BGCR[:, i]), -1)
                self.picks[(layer, g)].append((segment_C.cpu(), picked.cpu()))
            d = dist_BGCR[:, i][valid_CR.expand_as(dist_BGCR[:, i])]
            self.distances[(layer, g)].append(d.float().cpu())
            m = margin_BGC[:, i].flatten()
            self.margins[(layer, g)].append(m[torch.isfinite(m)].float().cpu())

    @torch.no_grad()
    def add_mass(self, layer: int, mode: str, prefix_share: torch.Tensor, segment_share: torch.Tensor) -> None:
        """Per-query shares (any shape, same for both) of one mode's heads."""
        entry = self.mass[(layer, mode)]
        entry[0] += float(prefix_share.double().sum())
        entry[1] += float(segment_share.double().sum())
        entry[2] += prefix_share.numel()

    # ---- reported by tbptt_backward -----------------------------------------------------------
    def add_cotangent(self, depth: int, tensors) -> None:
        self.cotangent_sq[depth] += float(sum(t.detach().double().pow(2).sum() for t in tensors))

    # ---- results -----------------------------------------------------------------------------
    def summary(self, grad_norm: float | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(TensorBoard scalars, histograms), names under ``segments/``."""
        scalars: dict[str, float] = {}
        hists: dict[str, torch.Tensor] = {}
        for (layer, g), parts in sorted(self.distances.items()):
            d = torch.cat(parts) if parts else torch.zeros(0)
            if d.numel():
                name = f"layer{layer}_group{g}"
                scalars[f"segments/retrieval_distance/{name}"] = float(d.mean())
                scalars[f"segments/retrieval_previous_segment_share/{name}"] = float((d == 1).float().mean())
                hists[f"segments/retrieval_distance_histogram/{name}"] = d
            m = torch.cat(self.margins[(layer, g)]) if self.margins[(layer, g)] else torch.zeros(0)
            if m.numel():
                scalars[f"segments/retrieval_margin/layer{layer}_group{g}"] = float(m.mean())
        for (layer, mode), (pre, seg, n) in sorted(self.mass.items()):
            if n:
                scalars[f"segments/prefix_mass/{mode}/layer{layer}"] = pre / n
                scalars[f"segments/segment_mass/{mode}/layer{layer}"] = seg / n
        depths = range(1, max(self.tbptt_k or 0, 1) + 1) if self.tbptt_k is not None else sorted(self.cotangent_sq)
        for depth in depths:
            norm = math.sqrt(self.cotangent_sq.get(depth, 0.0))
            scalars[f"segments/tail_cotangent_norm/depth{depth}"] = norm
            if grad_norm:
                scalars[f"segments/tail_cotangent_rel_grad/depth{depth}"] = norm / grad_norm
        return scalars, hists
