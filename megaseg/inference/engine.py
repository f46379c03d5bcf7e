"""Inference engine: segment-by-segment prefill and token decode (docs/semantics.md §6).

Every attention call is the one segmented operator with its cross-segment ``LayerState``;
nothing here re-implements attention. Prefill streams each prompt in segment-aligned
chunks (at most S tokens per call), so activations are O(S) and the state after each call
holds at most the open segment, the tail C, the retrieved prefix R and the pool. Decode
appends one token per call through the operator's decode entry points, which the engine
asks for by handing each layer a `megaseg.ops.decode.DecodeStep` in place of its state; a
segment that fills closes inside the operator.

Prompts of different lengths are batched by position (`megaseg.inference.batch_state`):
dense work (embedding, norms, projections, MLP, LM head) runs over the whole batch in one
call; prefill calls the attention core once per group of rows at one position, and decode
of rows at different positions runs one batched attention step per layer.

Shape legend: B batch, L tokens, E hidden, H query heads, G KV heads, D head dim, V vocab.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megaseg.config import ConfigError, ModelConfig
from megaseg.data.documents import document_spans
from megaseg.inference.batch_state import BatchState, SequenceGroup
from megaseg.inference.sampling import SamplingConfig, sample
from megaseg.ops.decode import RowsStep, TokenStep
from megaseg.ops.state import LayerState


def _drain(items: list):
    """Yield and drop the items of a list, so that the caller holds no reference to them."""
    while items:
        yield items.pop(0)


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

        The reference model's own forward runs over the whole batch, each layer's state
        replaced by a decode step (`megaseg.ops.decode`): rows at one position decode their
        batched `LayerState`s (`TokenStep`), rows at different positions take one batched
        step per layer over a `RowsState` (`RowsStep`).
        """
        tokens_B = torch.as_tensor(tokens_B, dtype=torch.long, device=self.device).flatten()
        B = tokens_B.numel()
        if B != state.batch_size:
            raise ValueError(f"decode got {B} tokens for a batch of {state.batch_size}")
        group = state.single_group()
        if group is not None:
            hidden, steps = self.decoder(tokens_B[:, None], [TokenStep(st) for st in _drain(group.states)])
            group.states = [step.state for step in steps]
        else:
            cores = [layer.self_attn.core for layer in self.decoder.layers]
            like = self.decoder.layers[0].self_attn.k_proj.weight
            hidden, _ = self.decoder(tokens_B[:, None], [RowsStep(rs) for rs in state.rows_states(cores, like)])
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
