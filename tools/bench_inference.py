"""Benchmark: megaseg vs full-attention prefill memory/time and decode time per token, CPU.

For each prompt length T the same Llama-shaped model (same weights, same tokens) is run
(a) by the inference engine with segmented attention (S, M, R and the head plan as given;
prefill in segment-aligned chunks) and (b) as full attention by stock transformers'
``LlamaForCausalLM`` with the same weights: ``scaled_dot_product_attention`` (the causal
kernel) over all T tokens and a ``DynamicCache`` holding the KV of every token. Decode then
appends tokens to that state: for full attention every new token attends to the whole cache.

Peak memory: every (kind, T) point runs in a fresh subprocess with glibc's mmap threshold
fixed (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own mapping and freeing it
returns the memory at once. After building the model and the prompt, the process resets
its resident-set high-water mark (Linux ``/proc/self/clear_refs``) and records the
current RSS; the prefill's memory is ``VmHWM - RSS before`` plus the weights (which the
RSS before already held), i.e. what a process needs beyond the Python/torch runtime.
Time, side by side: a separate process per T builds both kinds with the same weights
(stock transformers gets megaseg's parameters; at T <= S the two give the same logits,
which the run checks) and alternates them (``--repeats`` rounds, one from
``--single-repeat-from`` on): in each round each kind prefills the prompt and then decodes
``--decode-tokens`` tokens after it. The fastest prefill and the fastest mean decode step
of each kind count, so both see the same load on a shared machine; the ratios are taken
inside that one process. The memory processes also decode one whole segment after their
prefill (``decode_ms_per_token_segment``: a segment close and its retrieval included),
not side by side.

Batched decode (``--batch-rows``, default 8 rows; prompts of different lengths ending at
``--batch-context``): megaseg's engine decodes rows at different positions in one batched
step per layer; stock transformers decodes the left-padded batch with its attention mask
and per-row positions, as its ``generate`` does. Tokens per second (rows x steps / time),
fastest of ``--repeats`` alternating rounds, in its own process.

One torch thread by default: on a shared machine it is the least disturbed setting. The
memory model (megaseg.inference.memory_model) is evaluated at every point. The plot needs
matplotlib (``pip install megaseg[bench]``); without it the run says so and writes the
JSON only.

    python tools/bench_inference.py --out bench_results/inference.json --plot bench_results/inference.png
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig  # noqa: E402
from megaseg.inference import InferenceEngine  # noqa: E402
from megaseg.inference.memory_model import predict_prefill_memory  # noqa: E402
from megaseg.models.llama import SegmentedLlamaForCausalLM  # noqa: E402

MIB = 1024 * 1024
KINDS = ("megaseg", "full")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def bench_config(args, kind: str, T: int) -> ModelConfig:
    """The model shape; for full attention the segment settings are unused."""
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads)
    if kind == "full":
        return ModelConfig(**common, segment=SegmentConfig(T, 0, 0, 1),
                           head_plan=HeadPlan.all_local(args.layers, args.kv_heads))
    plan = HeadPlan.interleaved(args.layers, args.kv_heads, args.long_range_layers, args.long_heads)
    return ModelConfig(**common, segment=SegmentConfig(args.segment, args.tail, args.retrieval, 1), head_plan=plan)


class _SegmentedRunner:
    """megaseg: the inference engine (segment-aligned prefill, token decode)."""

    def __init__(self, cfg: ModelConfig):
        self.model = SegmentedLlamaForCausalLM(cfg).eval()
        self.engine = InferenceEngine(self.model)

    def prefill(self, ids):
        logits, self.state = self.engine.prefill([ids])
        return logits

    def release(self):
        self.state = None

    def decode(self, token):
        return self.engine.decode(token, self.state)

    def prefill_batch(self, prompts):
        logits, self.state = self.engine.prefill(prompts)
        return logits

    decode_batch = decode

    def state_bytes(self) -> int:
        return sum(self.state.nbytes().values())


class _FullAttentionRunner:
    """Full attention: transformers' LlamaForCausalLM, sdpa (causal flash kernel), DynamicCache."""

    def __init__(self, cfg: ModelConfig, weights: dict | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope.theta},
                             max_position_embeddings=1 << 20, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(hf_cfg).eval()
        if weights is not None:
            # megaseg's parameter names are LlamaForCausalLM's; only non-persistent buffers differ.
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"weights do not map one to one: missing {missing}, unexpected {unexpected}")
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def release(self):
        self.cache = None

    def prefill(self, ids):
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]

    def decode(self, token):
        out = self.model(input_ids=token[:, None], use_cache=True, **{self.cache_arg: self.cache})
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def prefill_batch(self, prompts):
        """Left-padded batch with its attention mask and per-row positions (as ``generate``)."""
        n = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), n, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), n, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):] = p
            self.mask[i, n - len(p):] = 1
        self.pos = (self.mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True, logits_to_keep=1)
        self.cache = out[self.cache_arg]
        self.pos = self.pos[:, -1:]
        return out.logits[:, -1]

    def decode_batch(self, tokens):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         **{self.cache_arg: self.cache})
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]


def _runner(args, kind: str, T: int, weights: dict | None = None):
    cfg = bench_config(args, kind, T)
    runner = _SegmentedRunner(cfg) if kind == "megaseg" else _FullAttentionRunner(cfg, weights)
    # Warm the kernels on a short prompt; the rotary tables a megaseg prefill grows stay
    # part of its own measurement (they are sized by S + max(M, R), not by T).
    small_cfg = cfg.replace(num_layers=1, head_plan=HeadPlan.all_local(1, cfg.num_kv_heads),
                            segment=SegmentConfig(64, 16, 0, 1))
    small = _SegmentedRunner(small_cfg) if kind == "megaseg" else _FullAttentionRunner(small_cfg)
    with torch.no_grad():
        token = small.prefill(torch.arange(160) % cfg.vocab_size).argmax(-1)
        for _ in range(4):
            token = small.decode(token).argmax(-1)
    return cfg, runner


def _prompt(cfg: ModelConfig, T: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(1))


def memory_point(args, kind: str, T: int) -> dict:
    """Peak memory of one prefill in this fresh process, then decode time per token."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, runner = _runner(args, kind, T)
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    ids = _prompt(cfg, T)
    with torch.no_grad():
        before = _status_bytes("VmRSS")
        _reset_peak()
        logits = runner.prefill(ids)
        peak = _status_bytes("VmHWM") - before
        state_bytes = runner.state_bytes()
        n_decode = cfg.segment.segment_length if kind == "megaseg" else args.decode_tokens
        token = logits.argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            token = runner.decode(token).argmax(-1)
        decode_s = time.perf_counter() - t0
    return {"kind": kind, "T": T, "peak_bytes": peak + weights, "peak_increment_bytes": peak,
            "weights_bytes": weights, "state_bytes": state_bytes, "decode_tokens_segment": n_decode,
            "decode_ms_per_token_segment": 1e3 * decode_s / n_decode}


def _same_weight_runners(args, T: int) -> dict:
    torch.manual_seed(0)
    cfg, seg = _runner(args, "megaseg", T)
    return {"megaseg": (cfg, seg), "full": _runner(args, "full", T, weights=seg.model.state_dict())}


def time_point(args, T: int) -> dict:
    """Fastest prefill and decode step of each kind, alternating so both see the same load."""
    torch.set_num_threads(args.threads)
    runners = _same_weight_runners(args, T)
    best = {"prefill_s": dict.fromkeys(KINDS, float("inf")), "decode_ms_per_token": dict.fromkeys(KINDS, float("inf"))}
    repeats = args.repeats if T < args.single_repeat_from else 1
    last = {}
    with torch.no_grad():
        for _ in range(repeats):
            for kind, (cfg, runner) in runners.items():
                runner.release()
                ids = _prompt(cfg, T)
                t0 = time.perf_counter()
                logits = runner.prefill(ids)
                best["prefill_s"][kind] = min(best["prefill_s"][kind], time.perf_counter() - t0)
                last[kind] = logits
                token = logits.argmax(-1)
                t0 = time.perf_counter()
                for _ in range(args.decode_tokens):
                    token = runner.decode(token).argmax(-1)
                step = 1e3 * (time.perf_counter() - t0) / args.decode_tokens
                best["decode_ms_per_token"][kind] = min(best["decode_ms_per_token"][kind], step)
    out = {"T": T, "repeats": repeats, "decode_tokens": args.decode_tokens, **best}
    if T <= args.segment:  # plain causal attention: the two must agree
        out["max_abs_logit_diff"] = (last["megaseg"].float() - last["full"].float()).abs().max().item()
    return out


def batch_point(args) -> dict:
    """Batched decode tokens/s, rows at different positions, alternating kinds."""
    torch.set_num_threads(args.threads)
    T = args.batch_context
    runners = _same_weight_runners(args, T)
    lengths = [T - args.batch_spread * i for i in range(args.batch_rows)]
    best = dict.fromkeys(KINDS, float("inf"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(args.repeats):
            for kind, (cfg, runner) in runners.items():
                runner.release()
                prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
                token = runner.prefill_batch(prompts).argmax(-1)
                t0 = time.perf_counter()
                for _ in range(args.decode_tokens):
                    token = runner.decode_batch(token).argmax(-1)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    steps = args.decode_tokens
    return {"rows": args.batch_rows, "prompt_lengths": lengths, "decode_steps": steps,
            "tokens_per_s": {k: args.batch_rows * steps / v for k, v in best.items()},
            "megaseg_over_full": best["full"] / best["megaseg"]}


def paper_table(lengths=(16384, 32768, 65536, 131072)) -> list[dict]:
    """Memory model for LLaMA2-7B, bf16, paper plan (S=4096, M=R=512, layers 6/8/11/18)."""
    seg = SegmentConfig(4096, 512, 512, 1)
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, segment=seg, head_plan=HeadPlan.paper_llama2_7b())
    rows = []
    for T in lengths:
        full = predict_prefill_memory(cfg, T, torch.bfloat16, "full")
        seg_ = predict_prefill_memory(cfg, T, torch.bfloat16, "megaseg")
        rows.append({"T": T, "full": full.as_dict(), "megaseg": seg_.as_dict(), "ratio": full.total / seg_.total})
    return rows


def _plot(results, path: Path, args) -> bool:
    try:
        import matplotlib
    except ImportError:
        print(f"\nmatplotlib is not installed: no plot written ({path}); pip install megaseg[bench] for it")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, color in (("megaseg", "tab:blue"), ("full", "tab:red")):
        pts = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["T"])
        Ts = [r["T"] for r in pts]
        axes[0].plot(Ts, [r["peak_bytes"] / MIB for r in pts], "o-", color=color, label=f"{kind} measured")
        axes[0].plot(Ts, [r["predicted_bytes"] / MIB for r in pts], "x--", color=color, label=f"{kind} model")
        axes[1].plot(Ts, [r["prefill_s"] for r in pts], "o-", color=color, label=kind)
        axes[2].plot(Ts, [r["decode_ms_per_token"] for r in pts], "o-", color=color, label=kind)
    titles = ("peak prefill memory (MiB)", "prefill time (s)", "decode time per token (ms)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length T (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"Llama-shaped E={args.hidden} L={args.layers} H={args.heads} F={args.intermediate} V={args.vocab}, "
                 f"fp32 CPU; megaseg S={args.segment} M={args.tail} R={args.retrieval}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688, help="Llama's 11008/4096 ratio by default")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--tail", type=int, default=128)
    p.add_argument("--retrieval", type=int, default=128)
    p.add_argument("--long-range-layers", type=int, nargs="*", default=[1])
    p.add_argument("--long-heads", type=int, default=1, help="KV groups in H_long (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per point (1: least disturbed on a shared machine)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per kind (fastest counts)")
    p.add_argument("--single-repeat-from", type=int, default=32768, help="time one prefill from this T on")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps per timed round (and batched round)")
    p.add_argument("--batch-rows", type=int, default=8, help="rows of the batched-decode row (0: skip it)")
    p.add_argument("--batch-context", type=int, default=1024, help="longest prompt of the batched-decode row")
    p.add_argument("--batch-spread", type=int, default=24, help="each further prompt is this much shorter")
    p.add_argument("--out", default="bench_results/inference.json")
    p.add_argument("--plot", default="bench_results/inference.png", help="'' for no plot; needs matplotlib")
    p.add_argument("--point", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    p.add_argument("--time-point", type=int, metavar="T", help=argparse.SUPPRESS)
    p.add_argument("--batch-point", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.point:
        print(json.dumps(memory_point(args, args.point[0], int(args.point[1]))))
        return 0
    if args.time_point:
        print(json.dumps(time_point(args, args.time_point)))
        return 0
    if args.batch_point:
        print(json.dumps(batch_point(args)))
        return 0

    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = []
    header = (f"{'T':>6} {'kind':>8} {'peak MiB':>9} {'model MiB':>9} {'err %':>6} {'prefill s':>9} "
              f"{'decode ms/tok':>13}")
    print(header)

    def sub(*extra):
        out = subprocess.run([sys.executable, __file__, *base, *extra], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed_by_T = {}
    for T in sorted(args.lengths):
        timed = timed_by_T[T] = sub("--time-point", str(T))
        for kind in KINDS:
            r = sub("--point", kind, str(T))
            r["prefill_s"] = timed["prefill_s"][kind]
            r["prefill_repeats"] = timed["repeats"]
            r["decode_ms_per_token"] = timed["decode_ms_per_token"][kind]
            r["decode_tokens"] = timed["decode_tokens"]
            pred = predict_prefill_memory(bench_config(args, kind, T), T, torch.float32, kind)
            r["predicted_bytes"] = pred.total
            r["predicted"] = pred.as_dict()
            r["model_error"] = pred.total / r["peak_bytes"] - 1
            results.append(r)
            print(f"{T:>6} {kind:>8} {r['peak_bytes'] / MIB:>9.1f} {pred.total / MIB:>9.1f} "
                  f"{100 * r['model_error']:>+6.1f} {r['prefill_s']:>9.3f} {r['decode_ms_per_token']:>13.2f}", flush=True)

    by = {(r["kind"], r["T"]): r for r in results}
    ratios = []
    print("\nmegaseg / stock transformers (same process, same weights; < 1 means megaseg is faster or smaller)")
    print(f"{'T':>6} {'memory':>8} {'prefill time':>12} {'decode ms/tok':>13} {'megaseg decode':>14} {'stock decode':>12} {'|logit diff|':>12}")
    for T in sorted(args.lengths):
        f, s = by[("full", T)], by[("megaseg", T)]
        row = {"T": T, "memory_ratio": f["peak_bytes"] / s["peak_bytes"], "prefill_time_ratio": f["prefill_s"] / s["prefill_s"],
               "megaseg_over_full_prefill_time": s["prefill_s"] / f["prefill_s"],
               "megaseg_over_full_decode": s["decode_ms_per_token"] / f["decode_ms_per_token"],
               "megaseg_decode_ms_per_token": s["decode_ms_per_token"], "full_decode_ms_per_token": f["decode_ms_per_token"],
               "megaseg_decode_ms_per_token_segment": s["decode_ms_per_token_segment"]}
        if "max_abs_logit_diff" in timed_by_T[T]:
            row["max_abs_logit_diff"] = timed_by_T[T]["max_abs_logit_diff"]
        ratios.append(row)
        diff = f"{row['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in row else "-"
        print(f"{T:>6} {s['peak_bytes'] / f['peak_bytes']:>8.2f} {row['megaseg_over_full_prefill_time']:>12.2f} "
              f"{row['megaseg_over_full_decode']:>13.2f} {s['decode_ms_per_token']:>14.2f} {f['decode_ms_per_token']:>12.2f} {diff:>12}")
    dec = {r["T"]: r["megaseg_decode_ms_per_token"] for r in ratios}
    summary = {}
    if 1024 in dec and 16384 in dec:
        summary["megaseg_decode_16k_over_1k"] = dec[16384] / dec[1024]
        print(f"\nmegaseg decode time per token, 16K / 1K context: {summary['megaseg_decode_16k_over_1k']:.2f}")
    summary["max_model_error"] = max(abs(r["model_error"]) for r in results)
    print(f"largest memory-model error: {100 * summary['max_model_error']:.1f} %")

    batched = None
    if args.batch_rows:
        batched = sub("--batch-point")
        print(f"\nbatched decode, {batched['rows']} rows, prompts {batched['prompt_lengths'][-1]}..{batched['prompt_lengths'][0]} "
              f"tokens, {batched['decode_steps']} steps: megaseg {batched['tokens_per_s']['megaseg']:.1f} tok/s, "
              f"stock {batched['tokens_per_s']['full']:.1f} tok/s, megaseg/stock {batched['megaseg_over_full']:.2f}")

    paper = paper_table()
    print("\nMemory model, LLaMA2-7B bf16, paper plan (S=4096, M=R=512, long-range layers 6/8/11/18, 8/32 long heads):")
    print(f"{'T':>7} {'full GiB':>9} {'megaseg GiB':>11} {'ratio':>6}")
    for row in paper:
        print(f"{row['T']:>7} {row['full']['total'] / 2**30:>9.1f} {row['megaseg']['total'] / 2**30:>11.1f} {row['ratio']:>6.2f}")

    config = {k: v for k, v in vars(args).items() if k not in ("point", "time_point", "batch_point", "out", "plot")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": config, "points": results, "ratios": ratios, "summary": summary,
                                          "batched_decode": batched, "paper_llama2_7b": paper}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        if _plot(results, Path(args.plot), args):
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
