"""Evaluators: perplexity vs context position and task accuracy vs context length.

Every mode runs the same way: the sequence streams through the model in chunks (the mode's
chunk, by default the segment length), each layer's core carrying its own state, and only
one chunk's logits exist at a time. Memory reported is ``peak_state_mib``: the largest
number of bytes held in attention state (KV caches, tails, retrieved prefixes, pools)
between chunks, counted exactly from the tensors. Process memory (weights, activations
of one chunk, allocator slack) is not included; ``rss_mib`` is the process high-water mark
at the end of the evaluation, for scale only (it never goes down).

``model`` is megaseg's reference model, as `megaseg.eval.loading.load_for_eval` loads it from
any checkpoint format; a transformers model (megaseg HF export or plain Llama/Qwen2/Mistral)
is accepted too and runs as its reference copy (`megaseg.eval.loading.reference_model`).

Task accuracy decodes the answer teacher-forced: the prediction at each answer position is
the argmax given the gold prefix, so an answer scores 1 exactly when greedy decoding would
produce it; partial credit is RULER's fraction of references found in the predicted text.
"""
from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from megaseg.eval.loading import reference_model
from megaseg.eval.modes import InferenceMode, installed
from megaseg.eval.tasks import Haystack, generate_many, score

MIB = 1024 * 1024


@dataclass
class SequenceRun:
    nll: torch.Tensor  # [T-1] float64: -log p(ids[t+1] | ids[:t+1])
    argmax: torch.Tensor  # [T-1] the model's most likely next token at each position
    peak_state_bytes: int
    seconds: float


def _state_bytes(states) -> int:
    return sum(s.nbytes() for s in states if s is not None and hasattr(s, "nbytes"))


@torch.no_grad()
def run_sequence(model, ids: Sequence[int] | torch.Tensor, chunk: int) -> SequenceRun:
    """Stream one sequence through ``model`` (in its installed mode) ``chunk`` tokens a call."""
    model = reference_model(model)
    ids_T = torch.as_tensor(ids, dtype=torch.long).flatten()
    T = ids_T.numel()
    dev = next(model.parameters()).device
    ids_T = ids_T.to(dev)
    states = [None] * model.config.num_layers
    nll = torch.empty(max(T - 1, 0), dtype=torch.float64)
    argmax = torch.empty(max(T - 1, 0), dtype=torch.long)
    peak = 0
    start_time = time.perf_counter()
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        logits, states = model(ids_T[None, start:stop], states)
        n = min(stop, T - 1) - start  # positions in this chunk that have a next token
        if n > 0:
            lp = torch.log_softmax(logits[0, :n].double(), -1)
            nll[start:start + n] = -lp.gather(1, ids_T[start + 1:start + 1 + n, None]).squeeze(1).cpu()
            argmax[start:start + n] = logits[0, :n].argmax(-1).cpu()
        peak = max(peak, _state_bytes(states))
    return SequenceRun(nll, argmax, peak, time.perf_counter() - start_time)


@dataclass
class PerplexityResult:
    mode: str
    length: int
    bucket: int
    bucket_ppl: list[float]  # perplexity of predictions made at positions [i*bucket, (i+1)*bucket)
    ppl: float  # over every predicted token
    mean_nll: float
    documents: int
    peak_state_mib: float
    seconds: float
    rss_mib: float = field(default=0.0)


def eval_documents(haystack: Haystack, length: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` natural-text sequences of exactly ``length`` tokens (BOS first when defined)."""
    tok = haystack.tokenizer
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    out = []
    for i in range(n):
        rng = random.Random(f"ppl:{length}:{seed}:{i}")
        out.append(bos + [t for c in haystack.chunks(length - len(bos), rng) for t in c])
    return out


def perplexity(model, mode: InferenceMode, documents: Iterable[Sequence[int]], bucket: int) -> PerplexityResult:
    docs = [list(d) for d in documents]
    length = max(len(d) for d in docs)
    mode.check_length(length)
    nb = -(-(length - 1) // bucket)
    sums, counts = [0.0] * nb, [0] * nb
    total, count, peak, seconds = 0.0, 0, 0, 0.0
    with installed(model, mode) as model:
        for d in docs:
            run = run_sequence(model, d, mode.chunk_size(model))
            for b in range(nb):
                part = run.nll[b * bucket:(b + 1) * bucket]
                sums[b] += float(part.sum())
                counts[b] += part.numel()
            total += float(run.nll.sum())
            count += run.nll.numel()
            peak, seconds = max(peak, run.peak_state_bytes), seconds + run.seconds
    mean = total / max(count, 1)
    return PerplexityResult(mode.name, length, bucket, [math.exp(s / max(c, 1)) for s, c in zip(sums, counts)],
                            math.exp(mean), mean, len(docs), peak / MIB, seconds, _rss_mib())


@dataclass
class TaskResult:
    mode: str
    task: str
    length: int
    accuracy: float  # mean score (fraction of references found), 0..1
    exact: float  # fraction of samples whose whole answer is the argmax (= greedy decoding)
    samples: int
    peak_state_mib: float
    seconds: float
    rss_mib: float = 0.0
    predictions: list[str] = field(default_factory=list)


def task_accuracy(model, mode: InferenceMode, tokenizer, task: str, length: int, n: int, haystack: Haystack,
                  seed: int = 0, keep_predictions: int = 2) -> TaskResult:
    mode.check_length(length)
    samples = generate_many(task, length, n, tokenizer, haystack, seed)
    scores, exact, preds, peak, seconds = [], 0, [], 0, 0.0
    with installed(model, mode) as model:
        for s in samples:
            run = run_sequence(model, s.ids, mode.chunk_size(model))
            p0 = len(s.input_ids) - 1
            pred_ids = run.argmax[p0:p0 + len(s.answer_ids)].tolist()
            text = tokenizer.decode(pred_ids)
            scores.append(score(text, s.references))
            exact += pred_ids == s.answer_ids
            if len(preds) < keep_predictions:
                preds.append(text)
            peak, seconds = max(peak, run.peak_state_bytes), seconds + run.seconds
    return TaskResult(mode.name, task, length, sum(scores) / len(scores), exact / len(samples), len(samples),
                      peak / MIB, seconds, _rss_mib(), preds)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
