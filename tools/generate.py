"""Generate text with a megaseg model: segmented prefill, then token-by-token decode.

    python tools/generate.py CHECKPOINT --prompt "Once upon a time" --max-new-tokens 64
    python tools/generate.py CHECKPOINT --prompt-file story.txt --temperature 0.8 --top-p 0.95
    python tools/generate.py CHECKPOINT --prompt-ids 1,523,88 --prompt-ids 1,77   # no tokenizer

CHECKPOINT is a pretraining checkpoint (the --save directory or one iter_* directory, any
TP/PP layout), a megaseg model directory, a megaseg HF export, or a plain HF Llama directory
(then the segment options say how to segment it). The segment options override the
checkpoint's settings, and so do

    python tools/generate.py CHECKPOINT --prompt "..." --full-attention   # one segment, all local, M = R = 0
    python tools/generate.py CHECKPOINT --prompt "..." --no-retrieval     # retrieval groups -> local, R = 0

(one line on stderr then says what runs instead of the checkpoint's settings). The tokenizer
(sentencepiece tokenizer.model or tokenizer.json) is the one CHECKPOINT carries unless
--tokenizer is given; text starts with BOS as the model was trained (a pretraining
checkpoint: no BOS; otherwise the tokenizer's add_bos_token).

Each prompt is printed before its continuation, on a line starting with `prompt: `; the
continuation follows on a line starting with `completion: ` (token ids, space-separated,
when there is no tokenizer); `--no-echo` prints the continuation alone. One prompt streams
its tokens as they are generated:

    prompt: def fibonacci(n):
    completion: <the generated text, as it is decoded>

Several prompts (or --no-stream) run as one batch and print when done, each line prefixed
with the prompt's index: `[0] prompt: ...`, `[0] completion: ...`, `[1] prompt: ...`; with
--no-echo only `[0] ...`, `[1] ...`. Everything else goes to stderr: a header line first,
and at the end prefill time, decode tokens/s and peak memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaseg.config import ConfigError  # noqa: E402
from megaseg.checkpoint.errors import CheckpointError  # noqa: E402
from megaseg.checkpoint.formats import read_model  # noqa: E402
from megaseg.checkpoint.weights import parse_dtype  # noqa: E402
from megaseg.hf.convert import check_sliding_window  # noqa: E402
from megaseg.segment_options import (  # noqa: E402
    OneLineArgumentParser, add_override_options, add_segment_options, checkpoint_settings, describe, resolve_overrides,
)
from megaseg.inference import InferenceEngine, SamplingConfig  # noqa: E402
from megaseg.inference.tokenizer import TextTokenizer, model_adds_bos  # noqa: E402

MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pretraining checkpoint, megaseg model directory, or HF (exported or Llama) directory")
    p.add_argument("--tokenizer", help="sentencepiece .model, tokenizer.json or a directory (default: CHECKPOINT)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="file whose whole text is one prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend the BOS token (default: as the model was trained; none for a pretraining checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-stream", action="store_true", help="print the completion only when done")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the continuation, not the prompt before it")
    p.add_argument("--document-reset", choices=("auto", "on", "off"), default="auto",
                   help="documents as the unit of state: after an EOD (the tokenizer's eos) the next token starts "
                        "from an empty state (auto: as the checkpoint's run trained, --reset-attention-mask)")
    add_segment_options(p)
    add_override_options(p)
    return p


def _prompts(args, tokenizer: TextTokenizer | None) -> tuple[list[list[int]], list[str]]:
    """The prompts as token ids, and each one as it is echoed: a text prompt as given, token
    ids as their text (space-separated ids without a tokenizer)."""
    texts = list(args.prompt) + [Path(f).read_text() for f in args.prompt_file]
    prompts, shown = [], []
    if texts:
        if tokenizer is None:
            raise CheckpointError(f"{args.checkpoint}: no tokenizer found for text prompts (pass --tokenizer or use --prompt-ids)")
        prompts += [tokenizer.encode(t, add_bos=not args.no_bos) for t in texts]
        shown += texts
    for spec in args.prompt_ids:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids={spec!r} is invalid: comma-separated integers expected") from None
        prompts.append(ids)
        shown.append(_text(ids, tokenizer))
    if not prompts:
        raise ConfigError("no prompt: pass --prompt, --prompt-file or --prompt-ids")
    return prompts, shown


def _text(ids, tokenizer: TextTokenizer | None) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def _echo(label: str, text: str, prefix: str = "") -> None:
    """``prefix + label + text`` on stdout, ending the line unless the text already does."""
    print(f"{prefix}{label}{text}", end="" if text.endswith("\n") else "\n")


def _document_eod(args, source, tokenizer) -> int | None:
    """The EOD that resets the state under --document-reset (None: no reset)."""
    mode = args.document_reset
    if mode == "auto":
        from megaseg.hf.convert import document_eod_of

        mode = "on" if document_eod_of(source) is not None else "off"
    if mode == "off":
        return None
    if tokenizer is None or tokenizer.eos_id is None:
        raise ConfigError("document_reset=on is invalid: the tokenizer names no eos (the end of a document)")
    return tokenizer.eos_id


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    ckpt = checkpoint_settings(path)
    segment, plan = resolve_overrides(args, ckpt) or (None, None)
    source = read_model(path, segment=segment, head_plan=plan)
    if segment is not None and ckpt.segment is not None:
        check_sliding_window(source, str(path))
        how = "--full-attention" if args.full_attention else "--no-retrieval" if args.no_retrieval else "segment options"
        print(f"# overridden ({how}): running {describe(segment, plan)} instead of the checkpoint's "
              f"{describe(ckpt.segment, ckpt.plan)}", file=sys.stderr)
    tok_path = args.tokenizer or source.tokenizer
    tokenizer = TextTokenizer.load(tok_path, add_bos=model_adds_bos(source)) if tok_path else None
    prompts, shown_prompts = _prompts(args, tokenizer)

    model = source.build(parse_dtype(args.dtype))
    cfg = model.config
    stop = list(args.stop_token)
    if tokenizer is not None and tokenizer.eos_id is not None and not args.ignore_eos:
        stop.append(tokenizer.eos_id)
    eod = _document_eod(args, source, tokenizer)
    engine = InferenceEngine(model, document_eod=eod)
    stream = len(prompts) == 1 and not args.no_stream
    shown = {"text": "", "ids": []}

    def on_token(row: int, token: int):
        if not stream:
            return
        shown["ids"].append(token)
        if tokenizer is None:
            print(token, end=" ", flush=True)
            return
        text = tokenizer.decode(shown["ids"])
        print(text[len(shown["text"]):], end="", flush=True)
        shown["text"] = text

    print(f"# {path.name}: {cfg.num_layers} layers, S={cfg.segment.segment_length} M={cfg.segment.tail_length} "
          f"R={cfg.segment.retrieval_length}, {len(prompts)} prompt(s) of {[len(p) for p in prompts]} tokens",
          file=sys.stderr)
    echo = not args.no_echo
    if stream and echo:
        _echo("prompt: ", shown_prompts[0])
        print("completion: ", end="", flush=True)
    result = engine.generate(prompts, args.max_new_tokens, sampling, stop, on_token)
    if stream:
        print()
    else:
        for i, ids in enumerate(result.tokens):
            if echo:
                _echo("prompt: ", shown_prompts[i], prefix=f"[{i}] ")
                _echo("completion: ", _text(ids, tokenizer), prefix=f"[{i}] ")
            else:
                print(f"[{i}] {_text(ids, tokenizer)}")
    s = result.stats
    prefill_rate = s.prompt_tokens / s.prefill_seconds if s.prefill_seconds > 0 else float("nan")
    print(f"prefill: {s.prompt_tokens} tokens in {s.prefill_seconds:.3f} s ({prefill_rate:.1f} tokens/s)", file=sys.stderr)
    print(f"decode: {s.generated_tokens} tokens in {s.decode_seconds:.3f} s ({s.decode_tokens_per_second:.1f} tokens/s)",
          file=sys.stderr)
    print(f"peak memory: {s.peak_rss_bytes / MIB:.1f} MiB RSS; segmented state at the end: "
          f"{s.state_bytes['bounded'] / MIB:.2f} MiB bounded + {s.state_bytes['pool'] / MIB:.2f} MiB pool",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
