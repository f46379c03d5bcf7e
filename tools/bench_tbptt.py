"""Benchmark: one training step of megaseg (TBPTT-1) beside its peers, CPU.

Rows, same model dims and the same tokens at every sequence length T:

* ``megatron_tbptt``  — megaseg's megatron-core path: `GPTModel` with the segmented
  attention layer (local spec), trained by the TBPTT-1 engine through `segment_forward`.
* ``reference_tbptt`` — megaseg's reference model (plain PyTorch), TBPTT-1.
* ``megatron_stock``  — stock megatron-core `GPTModel`, local spec (the unfused
  `DotProductAttention` that users without Transformer Engine get), RoPE, one causal
  full-attention step over all T tokens.
* ``sdpa_full``       — the reference model with one segment covering the sequence:
  causal ``scaled_dot_product_attention`` over all T tokens (docs/semantics.md §7).

Every (row, T) point runs in a fresh subprocess. After building the model, the tokens and
one warm-up step (gradient buffers stay allocated), the process resets its resident-set
high-water mark (Linux ``/proc/self/clear_refs``) and records the current RSS; the step's
peak memory is ``VmHWM - RSS before the step``. glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_``) so freed large blocks go back to the system. Step time is the
fastest of ``--repeats`` steps (one from ``--single-repeat-from`` on). A point whose predicted attention-score memory (the T x T
matrices the unfused path keeps for backward) exceeds ``--max-point-gib`` is skipped and
reported as such, not run.

CPU MFU. Each point also measures the GEMM throughput of the same threads in the same
process (fastest of several ``[T', E] x [E, 4E]``-shaped fp32 matmuls, the shape class of
the model's projections) and reports achieved FLOP/s as a fraction of it. FLOPs per
step, B = 1 sequence of T tokens, L layers, E hidden, H query heads, G KV groups, D head
dim, F MLP width, V vocabulary:

    dense forward      2 T (L (E (H D + 2 G D) + H D E + 3 E F) + E V)
    attention forward  4 D sum over layers and query heads of the attended (query, key)
                       pairs: causal T (T + 1) / 2 for full attention; per segment of n
                       tokens n (n + 1) / 2 + n P for megaseg, P the prefix the head's
                       mode gives (tail M, retrieved min(R, tokens before), 0)
    one step           3 x forward (backward = 2 x forward)
    TBPTT-K extra      each segment i < N - 1 is backpropagated min(K, N - 1 - i) more
                       times from its carried tails; that pass reaches layers 0..L-2 of
                       the segment (all positions) but not the last layer's attention/MLP
                       or the LM head: 2 x (forward FLOPs of layers 0..L-2 of the segment)

``--paired`` times only: for each T one process builds the ``--rows``, warms them and
alternates their steps for ``--repeats`` rounds, so the ratios between rows see the same
load (the separate processes above are needed for memory, but on a shared machine their
step times drift with the load between processes).

MFU counts executed FLOPs (the TBPTT extra included); ``model_flops`` without the extra
is reported as well. Both sides of every ratio are measured on the same machine in the
same run; one torch thread by default (the least disturbed setting on a shared machine).

    python tools/bench_tbptt.py --lengths 2048 4096 8192 16384 32768 --out bench_results/tbptt.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaseg.config import LOCAL, RETRIEVAL, HeadPlan, ModelConfig, SegmentConfig  # noqa: E402

ROWS = ("megatron_tbptt", "reference_tbptt", "megatron_stock", "sdpa_full")


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Reset this process's resident-set high-water mark (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_config(args, T: int, segmented: bool) -> ModelConfig:
    n_kv = args.heads
    plan = HeadPlan.contiguous(args.layers, n_kv, args.long_range_layers, args.long_heads) if segmented else None
    seg = SegmentConfig(args.segment if segmented else T, args.tail if segmented else 0,
                        args.retrieval if segmented else 0, 1)
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=n_kv, segment=seg, head_plan=plan,
    )


# ---- FLOPs -----------------------------------------------------------------------------
def _layer_dense_flops(cfg: ModelConfig, n: int) -> float:
    E, H, G, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return 2.0 * n * (E * (H * D + 2 * G * D) + H * D * E + 3 * E * F)


def _pairs_full(n: int) -> float:
    return n * (n + 1) / 2


def step_flops(cfg: ModelConfig, T: int, segmented: bool, k: int = 1) -> dict:
    """Forward, model (3 x forward) and executed FLOPs of one training step (docstring)."""
    hpg, D, L = cfg.heads_per_group, cfg.head_dim, cfg.num_layers
    head = 2.0 * T * cfg.hidden_size * cfg.vocab_size
    if not segmented:
        layer = _layer_dense_flops(cfg, T) + 4 * D * cfg.num_heads * _pairs_full(T)
        fwd = L * layer + head
        return {"forward": fwd, "model": 3 * fwd, "executed": 3 * fwd}
    S, M, R = cfg.segment.segment_length, cfg.segment.tail_length, cfg.segment.retrieval_length
    starts = list(range(0, T, S))
    fwd = head
    extra = 0.0
    for i, start in enumerate(starts):
        n = min(S, T - start)
        layers = []
        for modes in cfg.head_plan.modes:
            pairs = 0.0
            for mode in modes:
                prefix = 0 if i == 0 else (M if mode == LOCAL else min(R, start) if mode == RETRIEVAL else 0)
                pairs += hpg * (_pairs_full(n) + n * prefix)
            layers.append(_layer_dense_flops(cfg, n) + 4 * D * pairs)
        fwd += sum(layers)
        extra += min(k, len(starts) - 1 - i) * 2 * sum(layers[:-1])
    return {"forward": fwd, "model": 3 * fwd, "executed": 3 * fwd + extra}


def gemm_flops_per_s(cfg: ModelConfig, repeats: int = 5) -> float:
    """Fastest fp32 GEMM throughput of this process's threads, projection-shaped."""
    E = cfg.hidden_size
    a = torch.randn(2048, E)
    b = torch.randn(E, 4 * E)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2.0 * a.shape[0] * E * 4 * E / best


# ---- models ----------------------------------------------------------------------------
def _megatron_model(cfg: ModelConfig, stock: bool):
    from megaseg.megatron import parallel
    from megaseg.megatron.model import build_model, transformer_config_from

    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    if not stock:
        return build_model(cfg, use_te=False)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config_from(cfg)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.segment.segment_length,
        pre_process=True, post_process=True, parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(cfg.rope.theta),
    )


def _step_fn(row: str, cfg: ModelConfig):
    """(model, step(ids) -> loss) of one row."""
    import torch.nn.functional as F

    from megaseg.training.tbptt import full_sequence_loss, tbptt_backward

    if row == "reference_tbptt" or row == "sdpa_full":
        from megaseg.models.llama import SegmentedLlamaForCausalLM

        model = SegmentedLlamaForCausalLM(cfg)
        if row == "reference_tbptt":
            return model, lambda x: tbptt_backward(model, x, cfg.segment.segment_length, 1).loss

        def full(x):
            loss = full_sequence_loss(model, x)
            loss.backward()
            return loss.item()

        return model, full
    if row == "megatron_tbptt":
        from megaseg.megatron.model import segment_forward

        model = _megatron_model(cfg, stock=False)
        return model, lambda x: tbptt_backward(lambda ids, st: segment_forward(model, ids, st), x,
                                               cfg.segment.segment_length, 1).loss
    model = _megatron_model(cfg, stock=True)

    def stock(x):
        T = x.shape[1]
        pos = torch.arange(T)[None]
        labels = torch.roll(x, -1, 1)
        logits = model(x, position_ids=pos, attention_mask=None)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, :-1].flatten())
        loss.backward()
        return loss.item()

    return model, stock


def score_gib(args, row: str, T: int) -> float:
    """Attention scores of the unfused path, fp32 (GiB): the softmax [H, T, T] every layer
    keeps for backward, plus the scores and probabilities of the layer being computed
    (only the unfused stock row materializes them)."""
    if row != "megatron_stock":
        return 0.0
    return (args.layers + 2) * args.heads * T * T * 4 / 2**30


def run_point(args, row: str, T: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    segmented = row.endswith("tbptt")
    cfg = model_config(args, T, segmented)
    model, step = _step_fn(row, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    gemm = gemm_flops_per_s(cfg)
    warm = ids[:, : min(T, 2 * args.segment)] if segmented else ids[:, :256]
    step(warm)
    model.zero_grad(set_to_none=False)
    before = status_kib("VmRSS")
    reset_peak()
    times = []
    for _ in range(args.repeats if T < args.single_repeat_from else 1):
        t0 = time.perf_counter()
        loss = step(ids)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)
    seconds = min(times)
    peak = status_kib("VmHWM") - before
    gemm = max(gemm, gemm_flops_per_s(cfg))
    flops = step_flops(cfg, T, segmented)
    pool_mib = 0.0
    if segmented:
        g = sum(m == RETRIEVAL for layer in cfg.head_plan.modes for m in layer)
        pool_mib = 2 * T * g * cfg.head_dim * 4 / 2**20
    return {"row": row, "T": T, "loss": float(loss), "seconds": seconds, "peak_mib": peak / 1024, "pool_mib": pool_mib,
            "flops_model": flops["model"], "flops_executed": flops["executed"], "gemm_flops_per_s": gemm,
            "achieved_flops_per_s": flops["executed"] / seconds, "mfu": flops["executed"] / seconds / gemm}


def paired_point(args, T: int) -> dict:
    """Step times of ``--rows`` in one process, alternating row by row for ``--repeats``
    rounds (fastest counts): the ratios see the same load. No memory measurement."""
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (1, T), generator=torch.Generator().manual_seed(1))
    built = {}
    for row in args.rows:
        torch.manual_seed(0)
        segmented = row.endswith("tbptt")
        model, step = _step_fn(row, model_config(args, T, segmented))
        step(ids[:, : min(T, 2 * args.segment)] if segmented else ids[:, :256])
        model.zero_grad(set_to_none=False)
        built[row] = (model, step)
    best = dict.fromkeys(args.rows, float("inf"))
    for _ in range(args.repeats):
        for row, (model, step) in built.items():
            t0 = time.perf_counter()
            step(ids)
            best[row] = min(best[row], time.perf_counter() - t0)
            model.zero_grad(set_to_none=False)
    return {"T": T, "rounds": args.repeats, "seconds": best}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--tail", type=int, default=128)
    p.add_argument("--retrieval", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--long-range-layers", type=int, nargs="*", default=[1, 3])
    p.add_argument("--long-heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--single-repeat-from", type=int, default=16384, help="time one step from this T on")
    p.add_argument("--max-point-gib", type=float, default=8.0,
                   help="skip a point whose attention scores (unfused path) would need more than this")
    p.add_argument("--out", default="bench_results/tbptt.json")
    p.add_argument("--paired", action="store_true",
                   help="time only: per T one process alternates the --rows (no memory, no MFU)")
    p.add_argument("--point", nargs=2, metavar=("ROW", "T"), help=argparse.SUPPRESS)
    p.add_argument("--paired-point", type=int, metavar="T", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.point:
        print(json.dumps(run_point(args, args.point[0], int(args.point[1]))))
        return 0
    if args.paired_point:
        print(json.dumps(paired_point(args, args.paired_point)))
        return 0
    if args.paired:
        return _paired_main(args, list(argv if argv is not None else sys.argv[1:]))

    base = list(argv if argv is not None else sys.argv[1:])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    table = []
    for T in args.lengths:
        for row in args.rows:
            need = score_gib(args, row, T)
            if need > args.max_point_gib:
                table.append({"row": row, "T": T, "skipped": f"needs about {need:.1f} GiB of attention scores "
                                                              f"(> --max-point-gib {args.max_point_gib:g})"})
                print(f"  {row:16s} T={T:6d}  skipped: {table[-1]['skipped']}", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, *base, "--point", row, str(T)],
                                 capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                raise SystemExit(f"point {row} T={T} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            table.append(r)
            print(f"  {row:16s} T={T:6d}  {r['seconds']:8.2f} s  {r['peak_mib']:9.1f} MiB  MFU {100 * r['mfu']:5.1f} %",
                  flush=True)

    by = {(r["row"], r["T"]): r for r in table}
    print()
    head = f"{'T':>6} |" + "".join(f" {row + ' s':>19} | {'MiB':>7} | {'MFU%':>5} |" for row in args.rows)
    print(head)
    print("-" * len(head))
    for T in args.lengths:
        line = f"{T:>6} |"
        for row in args.rows:
            r = by[(row, T)]
            if "skipped" in r:
                line += f" {'skipped':>19} | {'-':>7} | {'-':>5} |"
            else:
                line += f" {r['seconds']:>19.2f} | {r['peak_mib']:>7.1f} | {100 * r['mfu']:>5.1f} |"
        print(line)

    def ratio(a, b, T):
        ra, rb = by.get((a, T)), by.get((b, T))
        if not ra or not rb or "skipped" in ra or "skipped" in rb:
            return None
        return ra["seconds"] / rb["seconds"]

    ratios = []
    for T in args.lengths:
        ratios.append({"T": T,
                       "megatron_over_reference": ratio("megatron_tbptt", "reference_tbptt", T),
                       "reference_tbptt_over_sdpa_full": ratio("reference_tbptt", "sdpa_full", T),
                       "megatron_tbptt_over_megatron_stock": ratio("megatron_tbptt", "megatron_stock", T)})
    print("\nstep-time ratios:")
    for r in ratios:
        print("  T={T:6d}  megatron/reference {a}  TBPTT-1/SDPA full {b}  megaseg megatron/stock megatron {c}".format(
            T=r["T"], **{k: "-" if v is None else f"{v:.2f}" for k, v in
                         (("a", r["megatron_over_reference"]), ("b", r["reference_tbptt_over_sdpa_full"]),
                          ("c", r["megatron_tbptt_over_megatron_stock"]))}))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("point", "out")},
                   "points": table, "ratios": ratios}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


def _paired_main(args, base) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for T in args.lengths:
        if any(score_gib(args, row, T) > args.max_point_gib for row in args.rows):
            print(f"  T={T:6d}  skipped: a row's attention scores exceed --max-point-gib {args.max_point_gib:g}")
            continue
        out = subprocess.run([sys.executable, __file__, *base, "--paired-point", str(T)],
                             capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            raise SystemExit(f"paired T={T} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        first = args.rows[0]
        r["over_" + first] = {row: r["seconds"][row] / r["seconds"][first] for row in args.rows}
        results.append(r)
        print(f"  T={T:6d}  " + "  ".join(f"{row} {r['seconds'][row]:.2f} s ({r['over_' + first][row]:.2f})"
                                          for row in args.rows), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("point", "paired_point", "out")},
                   "paired": results}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
