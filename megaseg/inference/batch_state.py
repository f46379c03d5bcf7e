"""The segmented state of a batch whose rows may sit at different positions.

Segment boundaries are absolute positions of each sequence and one operator call has a
single position (``LayerState.tokens``), so rows at the same position form a
``SequenceGroup`` whose states are batched: prefill calls the attention core once per
group, and decode of rows at one position is one `SegmentedAttention.decode` per layer.
Decode of rows at different positions runs one batched attention step per layer over a
`RowsState` (per-row positions and masks in one set of buffers; `megaseg.ops.decode`).
Left padding to a common length was rejected: it shifts every position of the shorter
prompts and so moves their segment boundaries, which changes what a token attends to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megaseg.ops.state import LayerState


def _index_state(st: LayerState, idx: torch.Tensor) -> LayerState:
    return replace(st, cache=None, **{k: v.index_select(0, idx) for k, v in st.tensors().items()})


def _cat_states(states: Sequence[LayerState]) -> LayerState:
    first = states[0]
    return replace(first, cache=None, **{k: torch.cat([getattr(s, k) for s in states], 0) for k in first.tensors()})


@dataclass
class SequenceGroup:
    """Rows of the batch that sit at the same position; ``states`` are batched over them.

    rows:   [b] indices of these sequences in the batch (any order; states follow it).
    states: one LayerState per layer, batch dimension b.
    """

    rows: torch.Tensor
    states: list[LayerState]

    @property
    def tokens(self) -> int:
        return self.states[0].tokens


class BatchState:
    """Segmented state of a batch of sequences that may sit at different positions.

    Two equivalent forms: ``groups`` (rows at equal position, batched `LayerState`s) and,
    while rows at different positions decode, one `RowsState` per layer (every row in
    one set of buffers, so a decode step is one batched call per layer). Reading
    ``groups`` converts back; the next decode step converts again.
    """

    def __init__(self, groups: Sequence[SequenceGroup], batch_size: int):
        self.batch_size = batch_size
        self._groups = _merge_equal_positions(groups)
        self._rows = None  # list of (core, RowsState) per layer while decoding rows at different positions

    @property
    def groups(self) -> list[SequenceGroup]:
        if self._rows is not None:
            self._groups = self._groups_from_rows()
            self._rows = None
        return self._groups

    @groups.setter
    def groups(self, value):
        self._groups, self._rows = value, None

    def single_group(self) -> SequenceGroup | None:
        """The one group when every row sits at one position, in batch order (and the state
        is not in rows form): its states decode batched as they are. Else None."""
        if self._rows is not None or len(self._groups) != 1:
            return None
        group = self._groups[0]
        return group if torch.equal(group.rows.cpu(), torch.arange(self.batch_size)) else None

    def rows_states(self, cores, like: torch.Tensor) -> list:
        """One `RowsState` per layer (built from the groups on first use; ``cores``: the
        layers' `SegmentedAttention`, ``like``: device and dtype)."""
        if self._rows is None:
            per_row: list[list[LayerState] | None] = [None] * self.batch_size
            for g in self._groups:
                for li, r in enumerate(g.rows.tolist()):
                    idx = torch.tensor([li], device=g.rows.device)
                    per_row[r] = [_index_state(st, idx) for st in g.states]
            self._rows = [(core, core.rows_state([per_row[r][layer] for r in range(self.batch_size)], like))
                          for layer, core in enumerate(cores)]
        return [rs for _, rs in self._rows]

    def _groups_from_rows(self) -> list[SequenceGroup]:
        dev = self._rows[0][1].k_open.device
        groups = []
        for r in range(self.batch_size):
            states = [core.rows_row(rs, r) for core, rs in self._rows]
            groups.append(SequenceGroup(torch.tensor([r], dtype=torch.long, device=dev), states))
        return _merge_equal_positions(groups)

    def positions(self) -> list[int]:
        """Tokens processed so far, per row."""
        out = [0] * self.batch_size
        for g in self.groups:
            for r in g.rows.tolist():
                out[r] = g.tokens
        return out

    def select(self, rows: Sequence[int]) -> "BatchState":
        """A new BatchState whose row i is this state's row ``rows[i]`` (drop, reorder, repeat)."""
        where = {}
        for gi, g in enumerate(self.groups):
            for li, r in enumerate(g.rows.tolist()):
                where[r] = (gi, li)
        picked: dict[int, tuple[list[int], list[int]]] = {}
        for new_row, old_row in enumerate(rows):
            if old_row not in where:
                raise IndexError(f"row {old_row} is not in a batch of {self.batch_size}")
            gi, li = where[old_row]
            new_rows, local = picked.setdefault(gi, ([], []))
            new_rows.append(new_row)
            local.append(li)
        groups = []
        for gi, (new_rows, local) in picked.items():
            idx = torch.tensor(local, dtype=torch.long, device=self.groups[gi].rows.device)
            groups.append(SequenceGroup(torch.tensor(new_rows, dtype=torch.long, device=idx.device),
                                        [_index_state(st, idx) for st in self.groups[gi].states]))
        return BatchState(groups, len(rows))

    def layer_tokens(self) -> list[dict[str, int]]:
        """Per layer, the KV tokens one row holds in each part of the state (max over rows).

        ``open`` (all groups, < S) and ``tail`` (local groups, <= M) are all that `local`
        and `segment` groups keep, so they stay within S + M whatever the context length;
        ``retrieved`` (<= R) and ``pool`` belong to retrieval groups, and only the pool grows.
        """
        out = []
        for li in range(len(self.groups[0].states) if self.groups else 0):
            row = dict.fromkeys(("open", "tail", "retrieved", "pool"), 0)
            for g in self.groups:
                st = g.states[li]
                for key, t in (("open", st.open_k), ("tail", st.tail_k), ("retrieved", st.ret_k), ("pool", st.pool_k)):
                    row[key] = max(row[key], 0 if t is None else t.shape[1])
            out.append(row)
        return out

    def reset_rows(self, rows: Sequence[int]) -> None:
        """Empty state for ``rows`` (a new document starts there: no tail, no pool, position 0)."""
        reset = set(int(r) for r in rows)
        if not reset:
            return
        groups, dev = [], None
        for g in self.groups:
            dev = g.rows.device
            local = [li for li, r in enumerate(g.rows.tolist()) if r not in reset]
            if local:
                idx = torch.tensor(local, dtype=torch.long, device=dev)
                groups.append(SequenceGroup(g.rows.index_select(0, idx), [_index_state(st, idx) for st in g.states]))
        layers = len(self._groups[0].states) if self._groups else 0
        groups.append(SequenceGroup(torch.tensor(sorted(reset), dtype=torch.long, device=dev),
                                    [LayerState() for _ in range(layers)]))
        self.groups = _merge_equal_positions(groups)

    def nbytes(self) -> dict[str, int]:
        """Bytes of state: ``pool`` (retrieval history) and ``bounded`` (everything else)."""
        pool = bounded = 0
        for g in self.groups:
            for st in g.states:
                for name, t in st.tensors().items():
                    n = t.numel() * t.element_size()
                    if name.startswith("pool"):
                        pool += n
                    else:
                        bounded += n
        return {"bounded": bounded, "pool": pool}


def _merge_equal_positions(groups: Sequence[SequenceGroup]) -> list[SequenceGroup]:
    """One group per position: equal positions imply equal state shapes, so states concatenate."""
    by_pos: dict[int, list[SequenceGroup]] = {}
    for g in groups:
        by_pos.setdefault(g.tokens, []).append(g)
    merged = []
    for pos in sorted(by_pos):
        gs = by_pos[pos]
        if len(gs) == 1:
            merged.append(gs[0])
            continue
        rows = torch.cat([g.rows for g in gs])
        states = [_cat_states([g.states[li] for g in gs]) for li in range(len(gs[0].states))]
        merged.append(SequenceGroup(rows, states))
    return merged
