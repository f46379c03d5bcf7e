"""Write training (or held-out evaluation) documents with recall in them as a megatron-core indexed dataset.

    python tools/make_recall_data.py --tokenizer-model TOK --output-prefix data/recall \\
        --tasks passkey,mqar,variable_tracking --documents 3000 --length 1024 \\
        --segment-length 256 --min-gap-segments 1 --max-gap-segments 3 --haystack-fraction 0.5 --seed 1234
    # writes data/recall_text_document.bin/.idx (train with the prefix data/recall_text_document)
    # and data/recall_needles.jsonl (one line per document: task, needle/question/answer offsets, gap)
    python tools/make_recall_data.py ... --split eval --output-prefix data/recall_eval   # held-out values

Every document is exactly --length tokens (or one of --lengths) and ends with eod; the
question is at the end, the needle --min-gap-segments..--max-gap-segments segment
boundaries before it. Tasks: passkey, niah_single, niah_multikey, niah_multivalue,
variable_tracking, mqar. See docs/recall_data.md. Bad arguments stop with one line and
exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.data.recall import RECALL_TASKS, RecallSettings, write_recall_dataset  # noqa: E402
from megaseg.data.tokenizer import TOKENIZER_TYPES  # noqa: E402

PROG = "make_recall_data.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error of the tool
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    p = _Parser(prog=PROG, description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-model", required=True,
                   help="sentencepiece .model file, or a Hugging Face tokenizer directory (tokenizer.json)")
    p.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                   help="Megatron's tokenizer type; default: from what --tokenizer-model holds")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_text_document.bin/.idx and <prefix>_needles.jsonl")
    p.add_argument("--tasks", type=_name_list, default=["passkey", "mqar", "variable_tracking"],
                   help=f"comma-separated, drawn uniformly per document; of {', '.join(RECALL_TASKS)} "
                        "(default: passkey,mqar,variable_tracking)")
    p.add_argument("--documents", type=int, default=1000, help="number of documents (default 1000)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--length", type=int, default=None, help="tokens per document, eod included (default 1024)")
    lengths.add_argument("--lengths", type=_int_list, default=None,
                         help="comma-separated lengths; each document draws one")
    p.add_argument("--segment-length", type=int, default=256, help="segment length S of the gap control (default 256)")
    p.add_argument("--min-gap-segments", type=int, default=1,
                   help="fewest segment boundaries between the needle's end and the question (default 1)")
    p.add_argument("--max-gap-segments", type=int, default=3, help="most segment boundaries (default 3)")
    p.add_argument("--haystack-fraction", type=float, default=0.0,
                   help="fraction of documents that are plain haystack text without recall (default 0)")
    p.add_argument("--split", choices=["train", "eval"], default="train",
                   help="plant values of the train part (default) or only of the held-out eval part")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of the value space held out for evaluation, by a hash of the value (default 0.1)")
    p.add_argument("--mqar-pairs", type=int, default=16, help="key-value pairs per MQAR document (default 16)")
    p.add_argument("--mqar-queries", type=int, default=8, help="queried keys per MQAR document (default 8)")
    p.add_argument("--copy-length", type=int, default=32,
                   help="tokens of the span a copy document repeats at its end (default 32)")
    p.add_argument("--vt-hops", type=int, default=4, help="variables per variable-tracking chain (default 4)")
    p.add_argument("--vt-chains", type=int, default=2, help="chains (one asked, the rest distractors) (default 2)")
    p.add_argument("--append-bos", action="store_true", help="start every document with the tokenizer's bos")
    p.add_argument("--corpus", default=None,
                   help="haystack text: stdlib (default, the embedded corpus) or a text file / directory")
    p.add_argument("--corpus-bytes", type=int, default=4 * 1024 * 1024, help="haystack corpus size cap (default 4 MiB)")
    p.add_argument("--value-digits", type=int, default=5,
                   help="digits of a pass key, magic number or variable value (default 5)")
    p.add_argument("--align-answer", action="store_true",
                   help="start a segment with the question's last token (the one that predicts the answer): the "
                        "retrieved prefix it reads is selected by the question's second-to-last token, which ends "
                        "the segment before; haystack text follows the answer")
    p.add_argument("--loss-mask", action="store_true",
                   help="also write <prefix>_loss_mask_document.bin/.idx (1 at answer tokens) for pretraining's "
                        "--loss-mask-data-path")
    p.add_argument("--seed", type=int, default=1234, help="same arguments and seed give byte-identical files")
    p.add_argument("--log-interval", type=int, default=1000, help="a progress line every N documents (default 1000)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\.")
    lengths = args.lengths if args.lengths is not None else [args.length if args.length is not None else 1024]
    try:
        settings = RecallSettings(
            tasks=args.tasks, documents=args.documents, lengths=lengths, segment_length=args.segment_length,
            min_gap_segments=args.min_gap_segments, max_gap_segments=args.max_gap_segments,
            haystack_fraction=args.haystack_fraction, seed=args.seed, split=args.split,
            eval_fraction=args.eval_fraction, mqar_pairs=args.mqar_pairs, mqar_queries=args.mqar_queries,
            copy_length=args.copy_length,
            vt_hops=args.vt_hops, vt_chains=args.vt_chains, append_bos=args.append_bos, corpus=args.corpus,
            corpus_bytes=args.corpus_bytes, value_digits=args.value_digits, align_answer=args.align_answer,
        )
        result = write_recall_dataset(args.tokenizer_model, args.output_prefix, settings,
                                      tokenizer_type=args.tokenizer_type,
                                      log=lambda line: print(line, flush=True), log_interval=args.log_interval,
                                      loss_mask=args.loss_mask)
    except (ValueError, OSError) as exc:  # RecallError / ConfigError, TokenizerError, unwritable output: one line
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    rate = result.documents / max(result.seconds, 1e-9)
    print(f"wrote {result.summary()} in {result.seconds:.1f}s ({rate:.0f} docs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
