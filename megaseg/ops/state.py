"""The cross-segment state of one layer (docs/semantics.md): what one call of the segmented
operator hands to the next, in training, prefill and decode alike.

Shape legend: B batch, S segment length, G KV groups (G_local / G_ret: those of the
`local` / `retrieval` groups), D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megaseg.ops.decode import DecodeCache


@dataclass
class LayerState:
    """Cross-segment state of one layer; nothing else crosses a segment boundary.

    tokens:          tokens processed so far; the open segment holds tokens % S of them.
    open_k/open_v:   [B, j, G, D] un-rotated KV of the open segment's tokens (all groups).
    tail_k/tail_v:   [B, m, G_local, D] C_{i-1}: last M KV of the previous segment, local
                     groups only; carries gradient in training.
    ret_k/ret_v:     [B, r, G_ret, D] R_{i-1}: retrieved prefix of the current segment (detached).
    pool_k/pool_v:   [B, T_closed, G_ret, D] retrieval-group KV of all closed segments (detached).
    cache:           decode buffers of the open segment (`megaseg.ops.decode.DecodeCache`),
                     or None; only `SegmentedAttention.decode` sets it. Derived from the
                     fields above and rebuilt from them whenever it does not match them,
                     so code that builds, selects or concatenates states may drop it.
    """

    tokens: int = 0
    open_k: torch.Tensor | None = None
    open_v: torch.Tensor | None = None
    tail_k: torch.Tensor | None = None
    tail_v: torch.Tensor | None = None
    ret_k: torch.Tensor | None = None
    ret_v: torch.Tensor | None = None
    pool_k: torch.Tensor | None = None
    pool_v: torch.Tensor | None = None
    cache: "DecodeCache | None" = field(default=None, repr=False, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def detached(self) -> "LayerState":
        return replace(self, **{k: v.detach() for k, v in self.tensors().items()})
