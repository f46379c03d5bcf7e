"""Score every (layer, KV group) of a model by how much it needs long-range context and
write a head plan with a budget of long-range heads.

    python tools/select_heads.py CHECKPOINT --budget 8 --output plan.json
    python tools/select_heads.py CHECKPOINT --budget 8 --length 8192 --segment-length 4096 \
        --documents 8 --tasks passkey,niah_multikey --metric loss --output plan.json

Calibration data: ``--documents`` natural-text sequences from the corpus plus
``--samples-per-task`` samples of each of ``--tasks`` (long-range recall cases), all of
``--length`` tokens; or, with ``--recall-data PREFIX``, the first ``--recall-documents``
documents of a ``tools/make_recall_data.py`` dataset (the data the model is to recall on),
scored on their answer tokens only. A group's score is the loss increase (or KL, ``--metric kl``) when only
its context is cut to what a `local` head sees (its segment of ``--segment-length`` tokens
and the ``--tail-length`` tokens before it), all other heads keeping full attention. Writes ``plan.json`` (per-layer modes: what ``--head-plan-file FILE``
of pretraining, tools/convert_hf.py and tools/generate.py reads) and ``plan.scores.json`` (scores,
ranking, the chosen heads per layer, and pretraining keys: head_plan_preset prior,
long_range_layers, long_range_heads).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaseg.config import ConfigError  # noqa: E402
from megaseg.checkpoint.errors import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="megaseg checkpoint directory or HF directory (with a tokenizer)")
    p.add_argument("--output", required=True, help="head plan JSON to write (scores go beside it)")
    p.add_argument("--budget", type=int, required=True, help="number of long-range (layer, KV group) pairs")
    p.add_argument("--long-range-layers", type=int, nargs="+", default=None,
                   help="choose only among the KV groups of these layers (default: every layer)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the checkpoint's)")
    p.add_argument("--corpus", default="stdlib", help="calibration text: stdlib, or a directory / file")
    p.add_argument("--length", type=int, help="tokens per calibration sequence (default: 2 x segment length)")
    p.add_argument("--segment-length", type=int, help="segment a cut head keeps (default: the model's)")
    p.add_argument("--documents", type=int, default=4, help="natural-text calibration sequences")
    p.add_argument("--tasks", default="passkey,niah_multikey", help="comma-separated recall tasks mixed in ('' for none)")
    p.add_argument("--samples-per-task", type=int, default=2)
    p.add_argument("--recall-data", default=None, help="make_recall_data.py --output-prefix: calibrate on its "
                   "documents, scored on their answers (instead of --documents/--tasks)")
    p.add_argument("--recall-documents", type=int, default=32, help="documents of --recall-data (default 32)")
    p.add_argument("--tail-length", type=int, help="M tokens before the segment a cut head keeps, as a `local` "
                   "head does (default: the model's M)")
    p.add_argument("--metric", default="loss", choices=("loss", "kl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p


def run(args) -> int:
    from megaseg.eval.evaluator import eval_documents
    from megaseg.eval.head_selection import plan_record, score_heads, select_plan, write_plan
    from megaseg.eval.loading import load_for_eval
    from megaseg.eval.tasks import Haystack, check_task, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [check_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    model, tok = load_for_eval(args.checkpoint, args.tokenizer)
    S = args.segment_length or model.config.segment.segment_length
    length = args.length or 2 * S
    if length <= S + 1:
        raise ConfigError(f"--length={length} is invalid: must exceed the segment length {S} + 1")
    targets = None
    if args.recall_data:
        from megaseg.eval.recall import load_recall_documents

        docs = load_recall_documents(args.recall_data, limit=args.recall_documents)
        seqs = [d.ids for d in docs]
        targets = [[p for a in d.answers for p in range(a.start, a.end)] for d in docs]
        length = max(map(len, seqs))
    else:
        hay = Haystack.from_source(tok, args.corpus)
        seqs = eval_documents(hay, length, args.documents, args.seed)
        seqs += [generate(t, length, args.seed * 1000 + i, tok, hay).ids for t in tasks for i in range(args.samples_per_task)]
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm

        progress = lambda items: tqdm(items, desc="scoring heads", file=sys.stderr)  # noqa: E731
    except ImportError:
        progress = None
    M = model.config.segment.tail_length if args.tail_length is None else args.tail_length
    scores = score_heads(model, seqs, S, args.metric, progress, tail=M, targets=targets)
    plan = select_plan(scores, args.budget, args.long_range_layers)
    record = plan_record(scores, plan, args.budget, args.metric, S, M)
    record.update(checkpoint=str(args.checkpoint), length=length, sequences=len(seqs), recall_data=args.recall_data,
                  candidate_layers=args.long_range_layers,
                  seconds=round(time.perf_counter() - t0, 2))
    path, side = write_plan(args.output, record)
    chosen = [(i, g) for i, row in enumerate(plan.modes) for g, m in enumerate(row) if m == "retrieval"]
    print("chosen heads (layer, group): " + ", ".join(f"({i}, {g})" for i, g in chosen))
    print(f"wrote {path} and {side}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
