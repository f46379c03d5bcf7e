"""Recall on planted documents, and why it succeeds or fails: accuracy with the retrieval hit rate.

The documents are those `tools/make_recall_data.py` writes (an indexed dataset and its
``_needles.jsonl`` sidecar, usually its held-out ``--split eval``). For every answer of every
document:

* **correct**: the model's argmax at each answer position (teacher forced: the prediction
  of answer token t is made at t - 1 with the true prefix, as greedy decoding would give
  for the first wrong token) equals the answer;
* **reach**: whether the needle (the value tokens the answer copies) lies in the segment
  that produces the answer or in the tail a `local` head carries (M tokens before it): then
  no retrieval is needed;
* **retrieved**, per retrieval (layer, KV group) and for any of them: every value token of
  the needle is among the tokens the operator's top-R picked for that segment, read from
  the operator's own retrieval indices (`megaseg.ops.stats.recording(keep_picks=True)`);
* **span retrieved**: at least one token of the needle from its first value token on was
  picked. A retrieval head reads a picked token's key and value at its layer, and below
  that layer every token has already attended to the tokens before it, so a picked token
  after the value can carry the value (in a 2-layer model, layer 0 writes it into the
  following tokens). Tokens before the value cannot;
* **by depth**: the same answers binned by where the needle lies in the document (its first
  value token over the document's length, in quarters), correct over counted per bin; and
  binned by where the needle sits in the retrieved prefix (the index of its first picked span
  token among a head's R picks in their original order, in quarters of R): the prefix's
  RoPE positions are that index, so a model that learned to read a fixed part of the prefix
  (e.g. at a training length where the needle always lies in the first segments) fails in
  the other bins;
* **needle share of picks**: of each retrieval head's R picks at that segment, the share
  inside the document's target needles (for MQAR the whole block of pairs). It tells a
  prefix too small for the needles (share near 1, hit rate below 1) from a selection that
  spends the prefix on the haystack (share low).

So a failure reads as "never retrieved" (selection) or "retrieved but not used" (the
attention over the prefix), and a success outside the local reach shows which head carried it.

Beside them, ``state_mib``: the attention state the mode holds (KV caches, tails, retrieved
prefixes, pools) when the longest document streams through it chunk by chunk, as prefill
and decode run it (`megaseg.eval.evaluator.run_sequence`), and ``full_state_mib``: full
attention's KV cache for the same document, counted. Full, StreamingLLM and Duo-style
modes are scored from that streamed run too, which equals one forward over the document.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megaseg.config import ConfigError
from megaseg.eval.evaluator import MIB, run_sequence
from megaseg.eval.modes import InferenceMode, installed
from megaseg.ops import stats


@dataclass
class Answer:
    start: int  # answer tokens [start, end) of the document
    end: int
    needle: list[int]  # token positions of the needle's value tokens (what the answer copies)
    span: tuple[int, int] | None = None  # [first value token, end of the needle text): may carry the value


@dataclass
class RecallDocument:
    ids: list[int]
    task: str
    gap_segments: int | None
    answers: list[Answer]
    # [start, end) of every target needle (for MQAR: the whole block of pairs); where a
    # retrieval head's picks should fall
    needles: list[tuple[int, int]] = field(default_factory=list)


def _needle_fields(record: dict) -> list[dict]:
    return [f for n in record.get("needles") or [] if n.get("role") == "target" for f in n.get("fields") or []]


def answers_of(record: dict) -> list[Answer]:
    """Each answer span with the positions of the needle value it copies: the target needle's
    value field of the same text (for MQAR: the value paired with the queried key)."""
    fields = _needle_fields(record)
    out = []
    spans = record.get("answers") or ([record["answer"]] if record.get("answer") else [])
    if record.get("task") == "mqar":
        pairs = {}
        for key, value in zip(fields[0::2], fields[1::2]):
            pairs[key["text"]] = value
        queries = [f for f in record["question"]["fields"] if f["name"] == "key"]
        for key, span in zip(queries, spans):
            value = pairs.get(key["text"])
            if value is not None:
                out.append(Answer(span["start"], span["end"], list(range(value["start"], value["end"]))))
        return out
    values = [f for f in fields if f.get("name") == "value"]
    ends = {id(f): n["end"] for n in record.get("needles") or [] if n.get("role") == "target"
            for f in n.get("fields") or []}
    for span in spans:
        text = span["text"].strip().rstrip(".")
        match = [f for f in values if f["text"].strip().rstrip(".") == text]
        if match:
            out.append(Answer(span["start"], span["end"], list(range(match[-1]["start"], match[-1]["end"])),
                              (match[0]["start"], ends.get(id(match[0]), match[0]["end"]))))
    return out


def load_recall_documents(prefix: str | Path, limit: int | None = None) -> list[RecallDocument]:
    """Documents of a recall dataset: ``prefix`` is the ``--output-prefix`` given to
    make_recall_data.py (reads ``<prefix>_text_document`` and ``<prefix>_needles.jsonl``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    sidecar = Path(prefix + "_needles.jsonl")
    data = prefix + "_text_document"
    if not sidecar.is_file() or not Path(data + ".idx").is_file():
        raise ConfigError(f"recall data {prefix!r} is invalid: expected {data}.bin/.idx and {sidecar} "
                          "(written by tools/make_recall_data.py --output-prefix PREFIX)")
    indexed = IndexedDataset(data)
    docs = []
    with open(sidecar) as fh:
        for i, line in enumerate(fh):
            if limit is not None and len(docs) >= limit:
                break
            record = json.loads(line)
            if record.get("task") == "haystack":
                continue
            ids = indexed[record["doc"]].tolist()
            needles = [(n["start"], n["end"]) for n in record.get("needles") or [] if n.get("role") == "target"]
            docs.append(RecallDocument(ids, record["task"], record.get("gap_segments"), answers_of(record), needles))
    return docs


@dataclass
class RecallResult:
    mode: str
    length: int
    documents: int
    answers: int
    accuracy: float  # answers whose every token is the argmax
    outside_reach: int  # answers whose needle is beyond the segment and the carried tail
    accuracy_outside_reach: float
    hit_rate: float  # of answers outside reach: needle retrieved by at least one retrieval head
    hit_rate_per_head: dict[str, float] = field(default_factory=dict)
    # answers outside reach: correct/wrong x retrieved/not retrieved
    table: dict[str, int] = field(default_factory=dict)
    span_hit_rate: float = float("nan")  # of answers outside reach: a token of the needle span retrieved
    span_table: dict[str, int] = field(default_factory=dict)  # correct/wrong x span retrieved/not
    # of answers outside reach, mean over them and the retrieval heads: the share of a head's
    # picks that lie in the document's target needles (1.0: it picked nothing else)
    needle_share: float = float("nan")
    # attention state (KV caches, tails, retrieved prefixes, pools) held between chunks when the
    # longest document streams through the mode, counted from the tensors (MiB)
    state_mib: float = float("nan")
    # what full attention holds for the same document: K and V of every token in every KV group
    # of every layer (MiB), so a mode's state has its ratio without running full attention
    full_state_mib: float = float("nan")
    # answers outside reach per quarter of the document the needle's value starts in:
    # bin -> [correct, answers]
    depth_accuracy: dict[str, list[int]] = field(default_factory=dict)
    # answers whose span a retrieval head picked, per quarter of R the first picked span token
    # sits at among that head's picks in their original order (its RoPE position in the prefix)
    prefix_position_accuracy: dict[str, list[int]] = field(default_factory=dict)


def full_attention_state_bytes(model, length: int) -> int:
    """Bytes of the KV cache full attention holds after ``length`` tokens of one sequence."""
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * length * next(model.parameters()).element_size()


QUARTERS = ("0-25%", "25-50%", "50-75%", "75-100%")


def _quarter(x: float) -> str:
    return QUARTERS[min(3, max(0, int(x * 4)))]


def _picked(rec: stats.SegmentStats, batch_row: int = 0) -> dict[tuple[int, int], dict[int, set[int]]]:
    """(layer, group) -> {segment served: positions picked} of one recorded forward."""
    out: dict[tuple[int, int], dict[int, set[int]]] = defaultdict(dict)
    for head, calls in rec.picks.items():
        for segment_C, picked_BCR in calls:
            for c, seg in enumerate(segment_C.tolist()):
                out[head][seg] = {p for p in picked_BCR[batch_row, c].tolist() if p >= 0}
    return out


@torch.no_grad()
def recall_accuracy(model, mode: InferenceMode, documents: list[RecallDocument]) -> RecallResult:
    """Accuracy and hit rate of ``model`` run in ``mode`` (one forward over each document,
    equal to prefill and decode by the consistency invariant)."""
    if not documents:
        raise ConfigError("no recall documents to evaluate")
    correct = total = outside = outside_correct = hits = span_hits = 0
    share_sum, share_n = 0.0, 0
    per_head: dict[str, int] = defaultdict(int)
    table = {"correct_retrieved": 0, "correct_not_retrieved": 0, "wrong_retrieved": 0, "wrong_not_retrieved": 0}
    span_table = dict.fromkeys(table, 0)
    by_depth = {q: [0, 0] for q in QUARTERS}
    by_prefix = {q: [0, 0] for q in QUARTERS}
    length = max(len(d.ids) for d in documents)
    with installed(model, mode) as model:
        cfg = model.config
        seg = mode.segment or cfg.segment
        S, M = seg.segment_length, seg.tail_length
        plan = mode.head_plan or cfg.head_plan
        for i, layer in enumerate(model.model.layers):  # where each core reports its picks
            layer.self_attn.core.layer_index = i
        segmented = mode.kind in ("megaseg", "no_retrieval")
        chunk = mode.chunk_size(model)
        longest = max(documents, key=lambda d: len(d.ids))
        state = run_sequence(model, longest.ids, chunk).peak_state_bytes
        for doc in documents:
            ids = torch.tensor([doc.ids])
            if segmented:  # one forward, recording each retrieval head's picks per segment
                with stats.recording(keep_picks=True) as rec:
                    logits = model(ids)[0][0]
                pred = logits.argmax(-1)
                picks = _picked(rec)
            else:  # window and full modes stream in chunks: no score matrix over the whole document
                pred = run_sequence(model, doc.ids, chunk).argmax
            in_needles = {p for a, b in doc.needles for p in range(a, b)}
            for ans in doc.answers:
                ok = bool((pred[ans.start - 1 : ans.end - 1] == ids[0, ans.start : ans.end]).all())
                total += 1
                correct += ok
                if not segmented:  # segment grid: reach and picks are defined
                    continue
                producing = (ans.start - 1) // S  # the segment whose queries predict the first answer token
                reach_start = producing * S - M if M else producing * S
                if min(ans.needle) >= reach_start:
                    continue
                outside += 1
                outside_correct += ok
                got = span_got = False
                at = None  # quarter of R the needle span's first pick sits at, in the first head that picked it
                for (layer, group), by_segment in picks.items():
                    chosen = by_segment.get(producing, set())
                    if chosen and doc.needles:
                        share_sum += len(chosen & in_needles) / len(chosen)
                        share_n += 1
                    if all(p in chosen for p in ans.needle):
                        per_head[f"layer{layer}_group{group}"] += 1
                        got = True
                    in_span = [i for i, p in enumerate(sorted(chosen))
                               if (ans.span is not None and ans.span[0] <= p < ans.span[1]) or p in ans.needle]
                    if ans.span is not None and any(p in chosen for p in range(*ans.span)):
                        span_got = True
                    if in_span and at is None:
                        at = _quarter(in_span[0] / len(chosen))
                span_got = span_got or got
                quarter = by_depth[_quarter(min(ans.needle) / len(doc.ids))]
                quarter[0] += ok
                quarter[1] += 1
                if at is not None:
                    by_prefix[at][0] += ok
                    by_prefix[at][1] += 1
                hits += got
                span_hits += span_got
                table[f"{'correct' if ok else 'wrong'}_{'retrieved' if got else 'not_retrieved'}"] += 1
                span_table[f"{'correct' if ok else 'wrong'}_{'retrieved' if span_got else 'not_retrieved'}"] += 1
    heads = sorted({f"layer{l}_group{g}" for l, row in enumerate(plan.modes)
                    for g, m in enumerate(row) if m == "retrieval"}) if mode.kind == "megaseg" else []
    return RecallResult(
        mode=mode.name, length=length, documents=len(documents), answers=total, accuracy=correct / max(total, 1),
        outside_reach=outside, accuracy_outside_reach=outside_correct / outside if outside else float("nan"),
        hit_rate=hits / outside if outside else float("nan"),
        hit_rate_per_head={h: per_head[h] / outside if outside else float("nan") for h in heads}, table=table,
        span_hit_rate=span_hits / outside if outside else float("nan"), span_table=span_table,
        needle_share=share_sum / share_n if share_n else float("nan"),
        state_mib=state / MIB, full_state_mib=full_attention_state_bytes(model, length) / MIB,
        depth_accuracy=by_depth if outside else {}, prefix_position_accuracy=by_prefix if outside else {})
