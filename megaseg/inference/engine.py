"""Inference engine: segment-by-segment prefill and token decode (docs/semantics.md §6).

Every attention call is the one segmented operator with its cross-segment ``LayerState``;
nothing here re-implements attention. Prefill streams each prompt in segment-aligned
chunks (at most S tokens per call), so activations are O(S) and the state after each call
holds at most the open segment, the tail C, the retrieved prefix R and the pool. Decode
appends one token per call; a segment that fills closes inside the operator.

Batching prompts of different lengths. Segment boundaries are absolute positions of each
sequence and one operator call has a single position (``LayerState.tokens``), so rows at
the same position form a ``SequenceGroup`` whose states are batched. Dense work
(embedding, norms, projections, MLP, LM head) runs over the whole batch in one call;
prefill calls the attention core once per group, and decode of rows at different
positions runs one batched attention step per layer over a `RowsState` (per-row positions
and masks in one set of buffers). Left padding to a common length was rejected:
it shifts every position of the shorter prompts and so moves their segment boundaries,
which changes what a token attends to.

Shape legend: B batch, L tokens, E hidden, H query heads, G KV heads, D head dim, V vocab.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from megaseg.config import ConfigError, ModelConfig
from megaseg.data.documents import document_spans
from megaseg.inference.sampling import SamplingConfig, sample
from megaseg.ops.segmented_attention import LayerState


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

    def rows_states(self, cores, like: torch.Tensor) -> list:
        """One `RowsState` per layer (built from the groups on first use)."""
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


class _RowsLayer:
    """One layer's `RowsState`, passed to the model as that layer's state: the core runs
    one batched decode step for all rows (`SegmentedAttention.decode_rows`)."""

    def __init__(self, rows_state):
        self.rows_state = rows_state

    def attend(self, core, q_BLHD, k_BLGD, v_BLGD):
        return core.decode_rows(q_BLHD, k_BLGD, v_BLGD, self.rows_state), self


def _drain(items: list):
    """Yield and drop the items of a list, so that the caller holds no reference to them."""
    while items:
        yield items.pop(0)


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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    state_bytes: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (a stop token that ended a row is included)
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    stats: GenerationStats


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class InferenceEngine:
    """Prefill, decode and generate with a segmented Llama model.

    ``model`` is a ``SegmentedLlamaForCausalLM`` or anything with the same ``model``
    (embed_tokens, layers, norm) and ``lm_head`` submodules, e.g. the exported Hugging
    Face model; ``config`` defaults to ``model.config``.

    ``document_eod``: documents are the unit of state (docs/semantics.md §8, for models
    trained with ``--reset-attention-mask``): the token after this id starts with an empty
    state, in a prompt and in decode, so a document's logits are those it has alone.
    """

    def __init__(self, model, config: ModelConfig | None = None, document_eod: int | None = None):
        self.model = model
        self.document_eod = document_eod
        self.config = config if config is not None else model.config
        if not isinstance(self.config, ModelConfig):
            raise TypeError("InferenceEngine needs a megaseg ModelConfig (pass config=...)")
        self.decoder = model.model
        self.lm_head = model.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---- prefill ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int] | torch.Tensor], all_logits: bool = False):
        """Run the prompts segment by segment from an empty state.

        Returns (logits, BatchState): logits of each prompt's last token [B, V], or with
        ``all_logits`` a list of per-prompt logits [L_i, V] for every prompt position.
        """
        ids = [self._as_ids(p, i) for i, p in enumerate(prompts)]
        if not ids:
            raise ValueError("prefill needs at least one prompt")
        if self.document_eod is not None:
            return self._prefill_documents(ids, all_logits)
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            by_len.setdefault(t.numel(), []).append(i)
        last = torch.empty(len(ids), self.config.vocab_size, device=self.device)
        full: list[torch.Tensor | None] = [None] * len(ids)
        groups = []
        for length, rows in by_len.items():
            batch_ids = torch.stack([ids[r] for r in rows])
            hidden_last, logits_all, states = self._prefill_group(batch_ids, all_logits)
            logits_last = self.lm_head(hidden_last)
            last = last.to(logits_last.dtype)
            last[rows] = logits_last
            if all_logits:
                for j, r in enumerate(rows):
                    full[r] = logits_all[j]
            groups.append(SequenceGroup(torch.tensor(rows, dtype=torch.long, device=self.device), states))
        return (full if all_logits else last), BatchState(groups, len(ids))

    def _prefill_documents(self, ids: list[torch.Tensor], all_logits: bool):
        """`prefill` with document reset: what precedes a prompt's last EOD is documents of
        their own (run alone, for their logits); the state continues from the part after it,
        empty when the prompt ends with the EOD."""
        eod = self.document_eod
        heads, tails = [], []
        for t in ids:
            spans = document_spans(t, eod)
            if t[-1] != eod:  # the open document carries the state on
                *closed, (cut, _) = spans
            else:
                closed, cut = spans, t.numel()
            heads.append([t[s:e] for s, e in closed])
            tails.append(t[cut:])
        live = [i for i, t in enumerate(tails) if t.numel()]
        logits_live, live_state = (None, None)
        if live:
            self.document_eod, saved = None, self.document_eod  # the tails hold no EOD
            try:
                logits_live, live_state = self.prefill([tails[i] for i in live], all_logits)
            finally:
                self.document_eod = saved
        last = torch.empty(len(ids), self.config.vocab_size, device=self.device)
        full: list[torch.Tensor | None] = [None] * len(ids)
        for i in range(len(ids)):
            parts = []
            for doc in heads[i]:
                if all_logits or (i not in live and doc is heads[i][-1]):
                    hidden_last, doc_logits, _ = self._prefill_group(doc[None], all_logits)
                    parts.append(doc_logits[0] if all_logits else None)
                    if i not in live and doc is heads[i][-1]:
                        last[i] = self.lm_head(hidden_last)[0].to(last.dtype)
            if i in live:
                k = live.index(i)
                last[i] = (logits_live[k][-1] if all_logits else logits_live[k]).to(last.dtype)
                parts.append(logits_live[k] if all_logits else None)
            if all_logits:
                full[i] = torch.cat(parts, 0)
        groups = []
        if live:
            for g in live_state.groups:
                groups.append(SequenceGroup(torch.tensor([live[r] for r in g.rows.tolist()], dtype=torch.long,
                                                         device=self.device), g.states))
        fresh = [i for i in range(len(ids)) if i not in live]
        if fresh:
            groups.append(SequenceGroup(torch.tensor(fresh, dtype=torch.long, device=self.device),
                                        [LayerState() for _ in range(self.config.num_layers)]))
        return (full if all_logits else last), BatchState(groups, len(ids))

    def _prefill_group(self, ids_BL: torch.Tensor, all_logits: bool):
        S = self.config.segment.segment_length
        states = [LayerState() for _ in range(self.config.num_layers)]
        pieces = []
        pos, L = 0, ids_BL.shape[1]
        while pos < L:
            n = min(S - pos % S, L - pos)  # up to the next segment boundary
            # Hand each layer its state and forget it here, so a layer's old pool is freed as
            # soon as the layer has built the new one (not after the whole chunk).
            hidden, states = self.decoder(ids_BL[:, pos : pos + n], _drain(states))
            last = hidden[:, -1].clone()
            if all_logits:
                pieces.append(self.lm_head(hidden))
            del hidden
            pos += n
        return last, (torch.cat(pieces, 1) if all_logits else None), states

    def _as_ids(self, prompt, index: int) -> torch.Tensor:
        t = torch.as_tensor(prompt, dtype=torch.long, device=self.device).flatten()
        if t.numel() == 0:
            raise ValueError(f"prompt {index} is empty: at least one token is needed")
        if int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size:
            raise ValueError(f"prompt {index} has token ids outside [0, {self.config.vocab_size - 1}]")
        return t

    # ---- decode -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens_B: torch.Tensor, state: BatchState) -> torch.Tensor:
        """Append one token per row; returns its logits [B, V] and updates ``state`` in place.

        The reference model's own forward runs over the whole batch. Rows at one position
        decode with their batched `LayerState`s; rows at different positions in one
        batched step per layer over a `RowsState` (``_RowsLayer``).
        """
        tokens_B = torch.as_tensor(tokens_B, dtype=torch.long, device=self.device).flatten()
        B = tokens_B.numel()
        if B != state.batch_size:
            raise ValueError(f"decode got {B} tokens for a batch of {state.batch_size}")
        single = (state._rows is None and len(state.groups) == 1
                  and torch.equal(state.groups[0].rows.cpu(), torch.arange(B)))
        if single:
            g = state.groups[0]
            hidden, g.states = self.decoder(tokens_B[:, None], _drain(g.states))
        else:
            cores = [layer.self_attn.core for layer in self.decoder.layers]
            like = self.decoder.layers[0].self_attn.k_proj.weight
            layers = [_RowsLayer(rs) for rs in state.rows_states(cores, like)]
            hidden, _ = self.decoder(tokens_B[:, None], layers)
        if self.document_eod is not None:  # an EOD ends its document: the next token starts afresh
            state.reset_rows([r for r, t in enumerate(tokens_B.tolist()) if t == self.document_eod])
        return self.lm_head(hidden)[:, 0]

    # ---- generate -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        stop_tokens: Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Prefill the prompts, then decode until a stop token or ``max_new_tokens``.

        ``on_token(row, token_id)`` is called for every generated token as it is chosen
        (streaming). Rows that finish leave the batch; the others go on.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
        stats = GenerationStats()
        stop = set(int(t) for t in stop_tokens)
        gen = sampling.generator()
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B

        t0 = time.perf_counter()
        logits, state = self.prefill(prompts)
        stats.prefill_seconds = time.perf_counter() - t0
        stats.prompt_tokens = sum(len(p) for p in prompts)
        active = list(range(B))  # prompt index of each row of `state`
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            next_ids = sample(logits, sampling, gen).tolist()
            keep = []
            for row, (p, tok) in enumerate(zip(active, next_ids)):
                out[p].append(tok)
                stats.generated_tokens += 1
                if on_token is not None:
                    on_token(p, tok)
                if tok in stop:
                    reasons[p] = "stop"
                else:
                    keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                state = state.select(keep)
                active = [active[r] for r in keep]
                next_ids = [next_ids[r] for r in keep]
            logits = self.decode(torch.tensor(next_ids), state)
            stats.decode_steps += 1
        stats.decode_seconds = time.perf_counter() - t0
        stats.state_bytes = state.nbytes()
        stats.peak_rss_bytes = peak_rss_bytes()
        return GenerationResult(out, reasons, stats)
