"""Benchmark: one TBPTT-1 training step vs one full-attention step, CPU, one process.

For each sequence length T, the same tiny Llama-shaped model and the same tokens are run
(a) through the TBPTT-K engine with segmented attention (S, M, R as given) and (b) as a
plain full-attention step: the identical model with one segment covering the sequence,
which is causal ``scaled_dot_product_attention`` over all T tokens (SEMANTICS §7).

Peak memory: every (kind, T) point runs in a fresh subprocess. After building the model,
the tokens and one warm-up step (gradient buffers stay allocated), the process resets
its resident-set high-water mark (Linux ``/proc/self/clear_refs``) and records the
current RSS; the step's peak memory is ``VmHWM - RSS before the step``. glibc's mmap
threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that large freed blocks go back to the
system instead of being kept in the heap, which would make RSS a record of the allocator's
history rather than of live tensors. Time is the wall
clock of the fastest of ``--repeats`` steps (the least disturbed by other load). The pair of kinds for one T runs back to back, so the ratios
compare like with like on a shared machine.

    python tools/bench_tbptt.py --lengths 2048 4096 8192 16384 32768 --out bench_results/tbptt.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.tbptt import full_sequence_loss, tbptt_backward


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_config(args, segment_length: int, segmented: bool) -> ModelConfig:
    n_kv = args.heads
    plan = HeadPlan.contiguous(args.layers, n_kv, args.long_range_layers, args.long_heads) if segmented else None
    seg = SegmentConfig(segment_length, args.tail if segmented else 0, args.retrieval if segmented else 0, 1)
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=n_kv, segment=seg, head_plan=plan,
    )


def run_point(args, kind: str, T: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    segmented = kind == "tbptt"
    cfg = model_config(args, args.segment if segmented else T, segmented)
    model = SegmentedLlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))

    def step(x):
        if segmented:
            return tbptt_backward(model, x, cfg.segment.segment_length, 1).loss
        loss = full_sequence_loss(model, x)
        loss.backward()
        return loss.item()

    step(ids[:, : min(T, 2 * args.segment)] if segmented else ids[:, :256])
    model.zero_grad(set_to_none=False)
    before = _status_kib("VmRSS")
    _reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = step(ids)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)
    seconds = min(times)
    peak = _status_kib("VmHWM") - before
    pool_mib = 0.0
    if segmented:
        g = sum(m == "retrieval" for layer in cfg.head_plan.modes for m in layer)
        pool_mib = 2 * T * g * cfg.head_dim * 4 / 2**20
    return {"kind": kind, "T": T, "loss": loss, "seconds": seconds, "peak_mib": peak / 1024, "pool_mib": pool_mib}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--tail", type=int, default=128)
    p.add_argument("--retrieval", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--long-range-layers", type=int, nargs="*", default=[1, 3])
    p.add_argument("--long-heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_results/tbptt.json")
    p.add_argument("--point", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.point:
        print(json.dumps(run_point(args, args.point[0], int(args.point[1]))))
        return

    base = [a for a in sys.argv[1:]]
    rows = []
    for T in args.lengths:
        pair = {}
        for kind in ("tbptt", "full"):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, __file__, *base, "--point", kind, str(T)],
                                 capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                raise SystemExit(f"point {kind} T={T} failed:\n{out.stderr[-2000:]}")
            pair[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {kind:5s} T={T:6d}  {pair[kind]['seconds']:8.2f} s  {pair[kind]['peak_mib']:9.1f} MiB", flush=True)
        rows.append({"T": T, "tbptt": pair["tbptt"], "full": pair["full"],
                     "time_ratio_tbptt_over_full": pair["tbptt"]["seconds"] / pair["full"]["seconds"],
                     "mem_ratio_full_over_tbptt": pair["full"]["peak_mib"] / pair["tbptt"]["peak_mib"]})

    print()
    print(f"{'T':>6} | {'TBPTT-1 s':>9} | {'full s':>8} | {'t ratio':>7} | {'TBPTT-1 MiB':>11} | {'pool MiB':>8} | {'full MiB':>9} | {'mem full/tb':>11}")
    print("-" * 90)
    for r in rows:
        tb, fu = r["tbptt"], r["full"]
        print(f"{r['T']:>6} | {tb['seconds']:>9.2f} | {fu['seconds']:>8.2f} | {r['time_ratio_tbptt_over_full']:>7.2f} | "
              f"{tb['peak_mib']:>11.1f} | {tb['pool_mib']:>8.1f} | {fu['peak_mib']:>9.1f} | {r['mem_ratio_full_over_tbptt']:>11.2f}")
    by_t = {r["T"]: r for r in rows}
    summary = {}
    if 4096 in by_t and max(by_t) > 4096:
        top = max(by_t)
        summary[f"tbptt_mem_{top}_over_4096"] = by_t[top]["tbptt"]["peak_mib"] / by_t[4096]["tbptt"]["peak_mib"]
        summary["tbptt_mem_growth_excl_pool"] = (by_t[top]["tbptt"]["peak_mib"] - by_t[top]["tbptt"]["pool_mib"]) / (
            by_t[4096]["tbptt"]["peak_mib"] - by_t[4096]["tbptt"]["pool_mib"])
        summary["time_ratio_at_4096"] = by_t[4096]["time_ratio_tbptt_over_full"]
    summary["tbptt_faster_from"] = min((r["T"] for r in rows if r["time_ratio_tbptt_over_full"] < 1), default=None)
    print("\nsummary:", json.dumps(summary))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "point"}, "rows": rows, "summary": summary}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
