"""Where documents start and end in a packed token sequence (docs/semantics.md §8)."""
from __future__ import annotations

import torch


def document_spans(ids: torch.Tensor, eod: int) -> list[tuple[int, int]]:
    """[start, end) of every document of the 1-D ``ids``: each ends with (and includes) an
    EOD, the last one may be open (no EOD yet); no span is empty."""
    ends = (torch.nonzero(ids == eod).flatten() + 1).tolist()
    n = ids.numel()
    bounds = [0] + [e for e in ends if e < n] + [n]
    return list(zip(bounds[:-1], bounds[1:]))
