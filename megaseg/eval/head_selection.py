"""Calibrated head selection: which (layer, KV group) needs long-range context?

Score of a (layer, group): run the calibration sequences with every head under full
attention, then again with only that group's context cut to its own segment (the
`segment` baseline mode, segment length S; with a tail M, to what a `local` head sees:
the segment plus the last M tokens before it); the score is the increase of

* ``loss``: mean next-token NLL over the calibration tokens (needs natural labels), or
* ``kl``:   mean KL(p_full || p_cut) of the next-token distributions (no labels needed),

over the predicted positions past the first segment (before it nothing is cut). A head
whose cut hurts most needs long-range context most. The plan for a budget of B long-range
heads makes the B best-scoring (layer, group) pairs `retrieval` in their layer and every
other group `local` (docs/semantics.md §2 with H_long given per layer), i.e. the `prior` preset
with an explicit per-layer mapping. It is written as the JSON list of per-layer modes that
``--head-plan-file FILE`` reads (pretraining, HF import, generation) and with pretraining keys beside it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from megaseg.config import ConfigError, HeadPlan
from megaseg.eval.baselines import FULL, SEGMENT_CUT, BaselineAttention

METRICS = ("loss", "kl")


def _install(model, cut: tuple[int, int] | None, segment_length: int, tail: int = 0):
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        modes = [SEGMENT_CUT if cut == (i, g) else FULL for g in range(cfg.num_kv_heads)]
        layer.self_attn.core = BaselineAttention(modes, cfg.rope, cfg.head_dim, cfg.heads_per_group,
                                                 segment_length=segment_length, tail=tail)


@torch.no_grad()
def _logprobs(model, seq: torch.Tensor) -> torch.Tensor:
    logits, _ = model(seq[None], [None] * model.config.num_layers)
    return torch.log_softmax(logits[0, :-1].double(), -1)


@torch.no_grad()
def score_heads(model, sequences: Sequence[Sequence[int]], segment_length: int | None = None,
                metric: str = "loss", progress=None, tail: int = 0,
                targets: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """Scores [layers, KV groups]; higher = needs long-range context more.

    ``tail`` = M > 0 cuts a group to what a megaseg `local` head sees (its segment and the
    last M tokens of the previous one) instead of its segment alone, so that a head that
    only needs the few tokens across a segment boundary does not score as long-range.
    ``targets[i]``, when given and not None, lists the token positions of sequence i whose
    prediction is scored (e.g. the answers of a recall document) instead of every token
    past the first segment.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is invalid: allowed {METRICS}")
    cfg = model.config
    S = segment_length or cfg.segment.segment_length
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    if not seqs or min(s.numel() for s in seqs) <= S + 1:
        raise ConfigError(f"calibration sequences must be longer than segment_length + 1 = {S + 1} tokens "
                          "(nothing is cut inside the first segment)")
    targets = list(targets) if targets is not None else [None] * len(seqs)
    if len(targets) != len(seqs):
        raise ConfigError(f"targets has {len(targets)} entries for {len(seqs)} calibration sequences")
    # prediction indices scored per sequence: position t is predicted at t - 1
    scored = []
    for s, t in zip(seqs, targets):
        if t is None:
            scored.append(torch.arange(S, s.numel() - 1))
            continue
        idx = torch.as_tensor(sorted({int(p) - 1 for p in t}), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < S or int(idx.max()) >= s.numel() - 1):
            raise ConfigError(f"calibration targets must lie past the first segment (positions {S + 1}.."
                              f"{s.numel() - 1}): nothing is cut inside it")
        scored.append(idx)
    if not sum(i.numel() for i in scored):
        raise ConfigError("no calibration position to score")
    saved = [layer.self_attn.core for layer in model.model.layers]
    try:
        _install(model, None, S)
        base = [_logprobs(model, s) for s in seqs]
        scores = torch.zeros(cfg.num_layers, cfg.num_kv_heads, dtype=torch.float64)
        pairs = [(i, g) for i in range(cfg.num_layers) for g in range(cfg.num_kv_heads)]
        for i, g in (progress(pairs) if progress else pairs):
            _install(model, (i, g), S, tail)
            total, count = 0.0, 0
            for s, lp0, idx in zip(seqs, base, scored):
                if not idx.numel():
                    continue
                lp = _logprobs(model, s)
                if metric == "loss":
                    tgt = s[1:, None]
                    d = lp0.gather(1, tgt).squeeze(1) - lp.gather(1, tgt).squeeze(1)
                else:
                    d = (lp0.exp() * (lp0 - lp)).sum(-1)
                total += float(d[idx].sum())
                count += idx.numel()
            scores[i, g] = total / count
    finally:
        for layer, core in zip(model.model.layers, saved):
            layer.self_attn.core = core
    return scores


def select_plan(scores: torch.Tensor, budget: int, layers: Sequence[int] | None = None) -> HeadPlan:
    """The plan whose `retrieval` groups are the ``budget`` highest-scoring (layer, group)
    pairs (ties: lower layer, then lower group), among the groups of ``layers`` when given
    (the paper fixes its long-range layers and chooses heads in them); everything else `local`."""
    L, G = scores.shape
    layers = list(range(L)) if layers is None else sorted(set(layers))
    if not layers or not all(isinstance(i, int) and 0 <= i < L for i in layers):
        raise ConfigError(f"layers={layers!r} is invalid: must be layers in [0, {L})")
    if not isinstance(budget, int) or not 0 <= budget <= len(layers) * G:
        raise ConfigError(f"budget={budget!r} is invalid: must be an integer in [0, {len(layers) * G}]")
    order = sorted(((i, g) for i in layers for g in range(G)), key=lambda p: (-float(scores[p]), p))
    chosen = order[:budget]
    heads: dict[int, list[int]] = {}
    for i, g in chosen:
        heads.setdefault(i, []).append(g)
    return HeadPlan.from_long_heads(L, G, sorted(heads), {i: sorted(gs) for i, gs in heads.items()})


def ranking(scores: torch.Tensor) -> list[tuple[int, int]]:
    L, G = scores.shape
    return sorted(((i, g) for i in range(L) for g in range(G)), key=lambda p: (-float(scores[p]), p))


def plan_record(scores: torch.Tensor, plan: HeadPlan, budget: int, metric: str, segment_length: int,
                tail: int = 0) -> dict:
    long = {i: [g for g, m in enumerate(layer) if m == "retrieval"] for i, layer in enumerate(plan.modes)}
    long = {i: gs for i, gs in long.items() if gs}
    # Pretraining takes one list of KV groups for all long-range layers: the groups chosen
    # most often (by summed score) among the chosen layers.
    layers = sorted(long)
    per_group = {}
    for i in layers:
        for g in long[i]:
            per_group[g] = per_group.get(g, 0.0) + float(scores[i, g])
    k = max((len(gs) for gs in long.values()), default=0)
    groups = sorted(sorted(per_group, key=lambda g: -per_group[g])[:k])
    return {
        "metric": metric, "segment_length": segment_length, "tail": tail, "budget": budget,
        "scores": [[round(float(x), 6) for x in row] for row in scores],
        "ranking": [list(p) for p in ranking(scores)],
        "modes": plan.to_list(),
        "long_heads": {str(i): gs for i, gs in long.items()},
        "pretraining": {"head_plan_preset": "prior", "long_range_layers": layers, "long_range_heads": groups},
    }


def write_plan(path: str | Path, record: dict) -> tuple[Path, Path]:
    """``path``: the per-layer modes list (what --head-plan-file FILE reads); ``path``.scores.json
    beside it: scores, ranking, the per-layer long heads and pretraining keys. Either file
    reads back with `megaseg.segment_options.read_plan_file`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record["modes"]) + "\n")
    side = p.with_suffix(".scores.json")
    side.write_text(json.dumps(record, indent=2) + "\n")
    return p, side
