"""Benchmark: context parallelism over segments (`megaseg.parallel.context`, `megaseg.training.chunk`), CPU, gloo.

Three measurements, all in one run:

1. **Bytes per layer per step, megaseg CP vs ring attention.** The paper's setting (32K
   tokens, S = 4096, M = R = 512, 4 context-parallel ranks, the ``paper-llama2-7b`` head
   plan: 32 layers x 32 KV groups, 8 interleaved long-range groups that retrieve in layers
   {6, 8, 11, 18} and stay in their segment elsewhere, head dim 128, bf16) from the exact
   formula `bytes_per_layer`, per layer type and averaged over the plan's layers, beside
   `ring_bytes_per_layer` (ring attention's *forward* bytes only; its backward sends about
   twice as much again, so the comparison favours ring). Then the same bytes are
   **measured** on a real 4-rank run: a narrow model (head dim ``--bytes-head-dim``, fp32)
   whose two layers have the plan's two layer types (24 local + 8 retrieval groups; 24
   local + 8 segment groups), at the same T, S, M, R and P, counting every tensor the ranks
   hand to ``torch.distributed.isend`` by (layer, kind) (the tag). Bytes are linear in head
   dim x element size, so measured = formula at that width checks the formula the paper
   numbers come from.
2. **Step time CP = 2 / CP = 1**, forward + backward of one sequence of ``--step-tokens``
   tokens (batch 1) with a small model. CP = 1 is what a user would otherwise run on one
   process: the sequential TBPTT-K engine (`tbptt_backward`) for K >= 0, the one-pass
   untruncated forward (`context_parallel_forward` with ``ChunkLayout(T, S, 1)``,
   ``tbptt_k=-1``) for K = -1. CP = 2 is two processes with the same tokens. The chunk path
   on one process (``ChunkLayout(T, S, 1)``, ``tbptt_k=K``: one forward of the whole
   sequence, then K pushes of the tail cotangents) is timed too, beside the sequential
   engine. One torch thread per
   process. The two ranks are spawned once; every round runs the CP = 1 rows on rank 0
   (rank 1 waits in a barrier) and then the CP = 2 rows on both, so the rows of a round
   see the same machine load. After one warm-up round, each row's median over
   ``--repeats`` rounds is reported (a CP = 2 step is the slower rank's), in wall time and
   in CPU time of the process (``time.process_time``; the slower rank's for CP = 2): on a
   machine shared with other work, wall time also counts the time a rank waits for a core
   while its peer waits for its message, CPU time shows the work alone. The time each CP = 2
   rank blocks in ``wait`` on its messages is recorded too. The losses of all
   rows of a K agree (checked).
3. **Peak memory per rank vs CP size** (1, 2, 4): one fresh spawn per size, the same model
   and sequence as 2. After a warm-up step of a mode (gradient buffers allocated), each
   rank resets its resident-set high-water mark (Linux ``/proc/self/clear_refs``), records
   its RSS, runs one step; the step's peak is ``VmHWM - RSS before``. glibc's mmap
   threshold is fixed (``MALLOC_MMAP_THRESHOLD_=65536``) so freed large blocks go back to
   the system between modes.

    python tools/bench_cp.py --out docs/benchmarks/cp.json --plot docs/benchmarks/cp.png
    python tools/bench_cp.py --quick --out cp_quick.json    # tiny sizes: checks the machinery, not numbers
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megaseg.config import LOCAL, RETRIEVAL, SEGMENT, HeadPlan, ModelConfig, SegmentConfig  # noqa: E402
from megaseg.parallel.context import KINDS, ChunkLayout  # noqa: E402
from megaseg.parallel.traffic import bytes_per_layer, ring_bytes_per_layer  # noqa: E402
from megaseg.segment_options import head_plan_from  # noqa: E402
from tools.bench_tbptt import reset_peak, status_kib  # noqa: E402

# The paper's setting (examples/llama2_7b_paper.yaml) at LLaMA2-7B's attention shape.
PAPER = dict(seq_length=32768, segment_length=4096, tail_length=512, retrieval_length=512, cp=4, num_layers=32,
             num_heads=32, num_kv_groups=32, head_dim=128, element_size=2, num_long_range_heads=8, batch=1)
QUICK_BYTES = dict(seq_length=96, segment_length=16, tail_length=4, retrieval_length=4)
KS = (1, -1)


def paper_plan(num_long_range_heads: int = 8) -> HeadPlan:
    return head_plan_from("paper-llama2-7b", 32, 32, num_long_range_heads=num_long_range_heads)


def layer_types(plan: HeadPlan) -> list[dict]:
    """Distinct (local, retrieval, segment) group counts of the plan's layers, with their layers."""
    types: dict[tuple[int, int, int], list[int]] = {}
    for layer in range(plan.num_layers):
        modes = plan.layer(layer)
        types.setdefault((modes.count(LOCAL), modes.count(RETRIEVAL), modes.count(SEGMENT)), []).append(layer)
    return [{"local_groups": lo, "retrieval_groups": r, "segment_groups": s, "layers": layers}
            for (lo, r, s), layers in sorted(types.items(), key=lambda kv: -kv[0][1])]


def formula_layer_bytes(layout: ChunkLayout, k: int, *, local_groups: int, retrieval_groups: int, head_dim: int,
                        heads_per_group: int, tail_length: int, retrieval_length: int, element_size: int,
                        batch: int = 1) -> dict[str, int]:
    return bytes_per_layer(layout, batch=batch, tbptt_k=k, head_dim=head_dim, local_groups=local_groups,
                           retrieval_groups=retrieval_groups, heads_per_group=heads_per_group,
                           tail_length=tail_length, retrieval_length=retrieval_length, element_size=element_size)


def paper_bytes(ks=KS) -> dict:
    """Formula bytes of the paper's setting, per layer type and averaged, beside ring attention."""
    p = PAPER
    plan = paper_plan(p["num_long_range_heads"])
    layout = ChunkLayout(p["seq_length"], p["segment_length"], p["cp"])
    ring = ring_bytes_per_layer(layout, batch=p["batch"], kv_groups=p["num_kv_groups"], head_dim=p["head_dim"],
                                element_size=p["element_size"])
    out = {"setting": dict(p), "ring_forward_bytes_per_layer": ring,
           "ring_step_bytes_per_layer_approx": 3 * ring, "by_k": {}}
    types = layer_types(plan)
    for k in ks:
        rows, total = [], 0
        for t in types:
            got = formula_layer_bytes(layout, k, local_groups=t["local_groups"], retrieval_groups=t["retrieval_groups"],
                                      head_dim=p["head_dim"], heads_per_group=p["num_heads"] // p["num_kv_groups"],
                                      tail_length=p["tail_length"], retrieval_length=p["retrieval_length"],
                                      element_size=p["element_size"], batch=p["batch"])
            n = sum(got.values())
            total += n * len(t["layers"])
            rows.append({**t, "bytes_by_kind": got, "bytes": n, "over_ring": n / ring})
        avg = total / plan.num_layers
        out["by_k"][str(k)] = {"layer_types": rows, "mean_bytes_per_layer": avg, "mean_over_ring": avg / ring,
                               "max_over_ring": max(r["over_ring"] for r in rows)}
    return out


# ---- spawned ranks ---------------------------------------------------------------------------
def _sum_ce(logits, labels):
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")


def _build(cfg: ModelConfig, seed: int = 0):
    from megaseg.megatron.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, use_te=False)


def _chunk_step(meg, tokens, labels, n_pred, chunk) -> float:
    """Forward + backward of this rank's chunk; returns this rank's part of the mean loss."""
    from megaseg.training.chunk import context_parallel_forward

    a, b = chunk.token_range
    loss = _sum_ce(context_parallel_forward(meg, tokens[:, a:b], chunk), labels[:, a:b]) / n_pred
    chunk.backward(loss)
    return loss.item()


def _sequential_step(meg, tokens, S, k) -> float:
    from megaseg.megatron.model import segment_forward
    from megaseg.training.tbptt import tbptt_backward

    return tbptt_backward(lambda ids, st: segment_forward(meg, ids, st), tokens, S, k).loss


def _tokens(cfg: ModelConfig, T: int):
    from megaseg.training.tbptt import segment_labels

    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    labels = segment_labels(tokens, None)
    return tokens, labels, int((labels != -100).sum())


def _init(rank, world, port, cp):
    torch.set_num_threads(1)
    from megaseg.megatron import parallel

    parallel.initialize_model_parallel(tp=1, cp=cp, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                       world_size=world, timeout_s=1800)


def _done():
    from megaseg.megatron import parallel

    parallel.destroy_model_parallel()


def _bytes_rank(rank, world, port, cfg, T, ks, out_dir):
    """Per K: bytes every rank handed to isend, by (layer, kind), summed over the ranks."""
    from megaseg.training.chunk import TrainingChunk

    _init(rank, world, port, world)
    counts: dict = {}
    real_isend = dist.isend

    def counting_isend(tensor, dst=None, group=None, tag=0, **kw):
        key = (tag // len(KINDS), KINDS[tag % len(KINDS)])
        counts[key] = counts.get(key, 0) + tensor.numel() * tensor.element_size()
        return real_isend(tensor, dst, group=group, tag=tag, **kw)

    dist.isend = counting_isend
    try:
        meg = _build(cfg)
        tokens, labels, n_pred = _tokens(cfg, T)
        layout = ChunkLayout(T, cfg.segment.segment_length, world)
        result = {}
        for k in ks:
            counts.clear()
            meg.zero_grad()
            dist.barrier()
            t0 = time.perf_counter()
            _chunk_step(meg, tokens, labels, n_pred, TrainingChunk.for_this_rank(layout, k))
            seconds = time.perf_counter() - t0
            keys = [(layer, kind) for layer in range(cfg.num_layers) for kind in KINDS]
            vec = torch.tensor([counts.get(key, 0) for key in keys], dtype=torch.float64)
            dist.all_reduce(vec)
            result[k] = {"bytes": {f"{layer}:{kind}": int(v) for (layer, kind), v in zip(keys, vec.tolist())},
                         "seconds": seconds, "peak_rss_mib": status_kib("VmHWM") / 1024}
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "bytes.pt"))
    finally:
        dist.isend = real_isend
        _done()


def _timed(fn):
    """(wall seconds, CPU seconds of this process, loss) of one step."""
    c0, t0 = time.process_time(), time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, time.process_time() - c0, loss


class _TimedWork:
    """A point-to-point request whose ``wait`` adds the time it blocks to ``blocked[0]``."""

    def __init__(self, work, blocked):
        self.work, self.blocked = work, blocked

    def wait(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.work.wait(*args, **kw)
        self.blocked[0] += time.perf_counter() - t0
        return out


def _step_rank(rank, world, port, cfg, T, ks, repeats, out_dir):
    """Rows of one round: CP = 1 rows on rank 0 (rank 1 waits), then the CP = 2 rows on both."""
    from megaseg.training.chunk import TrainingChunk

    _init(rank, world, port, world)
    blocked = [0.0]  # seconds this rank's chunk waited for its messages
    real_isend, real_irecv = dist.isend, dist.irecv
    dist.isend = lambda *a, **kw: _TimedWork(real_isend(*a, **kw), blocked)
    dist.irecv = lambda *a, **kw: _TimedWork(real_irecv(*a, **kw), blocked)
    try:
        meg = _build(cfg)
        S = cfg.segment.segment_length
        tokens, labels, n_pred = _tokens(cfg, T)
        one = ChunkLayout(T, S, 1)
        two = ChunkLayout(T, S, world)
        rows = []
        for k in ks:
            if k >= 0:
                rows.append((f"cp1_sequential_k{k}", k, 1, lambda k=k: _sequential_step(meg, tokens, S, k)))
                rows.append((f"cp1_chunk_k{k}", k, 1,
                             lambda k=k: _chunk_step(meg, tokens, labels, n_pred, TrainingChunk(one, 0, k))))
            else:
                rows.append((f"cp1_one_pass_k{k}", k, 1,
                             lambda k=k: _chunk_step(meg, tokens, labels, n_pred, TrainingChunk(one, 0, k))))
            rows.append((f"cp{world}_k{k}", k, world,
                         lambda k=k: _chunk_step(meg, tokens, labels, n_pred, TrainingChunk.for_this_rank(two, k))))
        times = {name: [] for name, *_ in rows}
        cpu = {name: [] for name, *_ in rows}
        waits = {name: [] for name, _, size, _ in rows if size > 1}
        losses = {}
        for round_ in range(repeats + 1):  # round 0 warms up
            order = rows if round_ % 2 == 0 else rows[::-1]
            for name, k, size, fn in order:
                meg.zero_grad()
                dist.barrier()
                if size == 1:
                    seconds, cpu_s, loss = _timed(fn) if rank == 0 else (0.0, 0.0, 0.0)
                    dist.barrier()  # rank 1 waits here
                else:
                    blocked[0] = 0.0
                    seconds, cpu_s, loss = _timed(fn)
                    mine = torch.tensor([seconds, cpu_s, loss, blocked[0]], dtype=torch.float64)
                    gathered = [torch.zeros_like(mine) for _ in range(world)]
                    dist.all_gather(gathered, mine)
                    seconds = max(g[0].item() for g in gathered)
                    cpu_s = max(g[1].item() for g in gathered)
                    loss = sum(g[2].item() for g in gathered)
                    if round_:
                        waits[name].append([g[3].item() for g in gathered])
                if round_:
                    times[name].append(seconds)
                    cpu[name].append(cpu_s)
                losses[name] = loss
        if rank == 0:
            torch.save({"rows": [(n, k, s) for n, k, s, _ in rows], "times": times, "cpu": cpu, "losses": losses,
                        "blocked": waits}, os.path.join(out_dir, "step.pt"))
    finally:
        dist.isend, dist.irecv = real_isend, real_irecv
        _done()


def _memory_rank(rank, world, port, cfg, T, ks, out_dir):
    """Peak RSS growth of one step per mode on this rank (fresh process)."""
    from megaseg.training.chunk import TrainingChunk

    _init(rank, world, port, world)
    try:
        meg = _build(cfg)
        S = cfg.segment.segment_length
        tokens, labels, n_pred = _tokens(cfg, T)
        layout = ChunkLayout(T, S, world)
        modes = []
        if world == 1:
            modes += [(f"sequential_k{k}", lambda k=k: _sequential_step(meg, tokens, S, k)) for k in ks if k >= 0]
        modes += [(f"chunk_k{k}", lambda k=k: _chunk_step(meg, tokens, labels, n_pred,
                                                          TrainingChunk.for_this_rank(layout, k))) for k in ks]
        result = {}
        for name, fn in modes:
            meg.zero_grad(set_to_none=False)
            fn()  # warm-up: gradient buffers allocated
            meg.zero_grad(set_to_none=False)
            gc.collect()
            dist.barrier()
            before = status_kib("VmRSS")
            reset_peak()
            fn()
            peak = status_kib("VmHWM") - before
            gc.collect()
            got = [None] * world
            dist.all_gather_object(got, {"before_mib": before / 1024, "step_peak_mib": peak / 1024})
            result[name] = got
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"memory{world}.pt"))
    finally:
        _done()


def _spawn(fn, world, *args):
    from megaseg.megatron.parallel import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(fn, args=(world, free_port(), *args, out_dir), nprocs=world, join=True)
        name = {"_bytes_rank": "bytes.pt", "_step_rank": "step.pt"}.get(fn.__name__, f"memory{world}.pt")
        return torch.load(os.path.join(out_dir, name), weights_only=False)


# ---- the three measurements ----------------------------------------------------------------
def bytes_model(args) -> tuple[ModelConfig, int]:
    """Narrow model with the paper plan's two layer types (or tiny ones with --quick)."""
    plan = paper_plan(PAPER["num_long_range_heads"])
    retrieval_layer = next(i for i in range(plan.num_layers) if RETRIEVAL in plan.layer(i))
    other_layer = next(i for i in range(plan.num_layers) if RETRIEVAL not in plan.layer(i))
    shape = QUICK_BYTES if args.quick else PAPER
    D = args.bytes_head_dim
    cfg = ModelConfig(
        vocab_size=128, hidden_size=PAPER["num_heads"] * D, intermediate_size=64, num_layers=2,
        num_heads=PAPER["num_heads"], num_kv_heads=PAPER["num_kv_groups"], head_dim=D,
        segment=SegmentConfig(shape["segment_length"], shape["tail_length"], shape["retrieval_length"], 1),
        head_plan=HeadPlan((plan.layer(retrieval_layer), plan.layer(other_layer))),
    )
    return cfg, shape["seq_length"]


def measure_bytes(args) -> dict:
    cfg, T = bytes_model(args)
    P = args.bytes_cp
    t0 = time.perf_counter()
    got = _spawn(_bytes_rank, P, cfg, T, KS)
    layout = ChunkLayout(T, cfg.segment.segment_length, P)
    out = {"model": _model_dict(cfg), "seq_length": T, "cp": P, "element_size": 4, "by_k": {},
           "wall_seconds": time.perf_counter() - t0}
    for k in KS:
        layers = []
        for layer in range(cfg.num_layers):
            modes = cfg.head_plan.layer(layer)
            formula = formula_layer_bytes(layout, k, local_groups=modes.count(LOCAL),
                                          retrieval_groups=modes.count(RETRIEVAL), head_dim=cfg.head_dim,
                                          heads_per_group=cfg.heads_per_group, tail_length=cfg.segment.tail_length,
                                          retrieval_length=cfg.segment.retrieval_length, element_size=4)
            measured = {kind: got[k]["bytes"][f"{layer}:{kind}"] for kind in KINDS}
            layers.append({"layer": layer, "local_groups": modes.count(LOCAL),
                           "retrieval_groups": modes.count(RETRIEVAL), "segment_groups": modes.count(SEGMENT),
                           "measured": measured, "formula": formula, "equal": measured == formula,
                           "measured_total": sum(measured.values()), "formula_total": sum(formula.values())})
        out["by_k"][str(k)] = {"layers": layers, "step_seconds_rank0": got[k]["seconds"],
                               "peak_rss_mib_rank0": got[k]["peak_rss_mib"]}
    out["all_equal"] = all(row["equal"] for v in out["by_k"].values() for row in v["layers"])
    return out


def step_model(args) -> ModelConfig:
    S, M, R = (16, 4, 4) if args.quick else (args.segment, args.tail, args.retrieval)
    hidden = 32 if args.quick else args.hidden
    layers = 2 if args.quick else args.layers
    long_layers = [1] if args.quick else args.long_range_layers
    return ModelConfig(
        vocab_size=64 if args.quick else args.vocab, hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 8 * 8, num_layers=layers, num_heads=args.heads,
        num_kv_heads=args.heads, segment=SegmentConfig(S, M, R, 1),
        head_plan=HeadPlan.contiguous(layers, args.heads, long_layers, 1),
    )


def step_tokens(args) -> int:
    return 128 if args.quick else args.step_tokens


def measure_steps(args) -> dict:
    cfg, T = step_model(args), step_tokens(args)
    repeats = 1 if args.quick else args.repeats
    load = os.getloadavg()[0]
    got = _spawn(_step_rank, 2, cfg, T, KS, repeats)
    med = {name: statistics.median(ts) for name, ts in got["times"].items()}
    med_cpu = {name: statistics.median(ts) for name, ts in got["cpu"].items()}
    out = {"model": _model_dict(cfg), "seq_length": T, "repeats": repeats, "times": got["times"],
           "cpu_seconds": got["cpu"], "median_seconds": med, "median_cpu_seconds": med_cpu,
           "blocked_seconds_per_rank": got["blocked"],
           "median_blocked_seconds_per_rank": {name: [statistics.median(r[i] for r in rounds)
                                                      for i in range(len(rounds[0]))]
                                               for name, rounds in got["blocked"].items()},
           "losses": got["losses"], "ratios": {},
           "load_average_1min": [load, os.getloadavg()[0]]}
    for k in KS:
        base = f"cp1_sequential_k{k}" if k >= 0 else f"cp1_one_pass_k{k}"
        losses = [v for name, v in got["losses"].items() if name.endswith(f"_k{k}")]
        out["ratios"][str(k)] = {
            "cp1_baseline": base,
            "cp2_over_cp1": med[f"cp2_k{k}"] / med[base],
            "cp2_over_cp1_cpu_seconds": med_cpu[f"cp2_k{k}"] / med_cpu[base],
            **({"cp1_chunk_over_sequential": med[f"cp1_chunk_k{k}"] / med[base]} if k >= 0 else {}),
            "loss_max_rel_diff": max(abs(a - losses[0]) / abs(losses[0]) for a in losses),
        }
    return out


@contextlib.contextmanager
def fixed_mmap_threshold():
    """Spawned ranks run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536), so
    freed large blocks go back to the system between the modes a rank measures."""
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old


def measure_memory(args) -> dict:
    cfg, T = step_model(args), step_tokens(args)
    with fixed_mmap_threshold():
        by_size = {str(P): _spawn(_memory_rank, P, cfg, T, KS) for P in args.memory_cp}
    summary = {}
    for P, modes in by_size.items():
        for mode, ranks in modes.items():
            summary.setdefault(mode, {})[P] = max(r["step_peak_mib"] for r in ranks)
    return {"method": "per rank: VmHWM - VmRSS before one step, after a warm-up step and a clear_refs reset of "
                      "the high-water mark; MALLOC_MMAP_THRESHOLD_=65536; the max over ranks is summarised",
            "model": _model_dict(cfg), "seq_length": T, "per_rank": by_size, "max_rank_step_peak_mib": summary}


def _model_dict(cfg: ModelConfig) -> dict:
    return {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "segment_length": cfg.segment.segment_length,
            "tail_length": cfg.segment.tail_length, "retrieval_length": cfg.segment.retrieval_length,
            "head_plan": cfg.head_plan.to_list(), "dtype": "float32"}


# ---- printing ----------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def print_tables(result: dict) -> None:
    pb = result["paper_bytes"]
    ring = pb["ring_forward_bytes_per_layer"]
    print(f"\n1. bytes per layer per step, paper setting (T=32768, S=4096, M=R=512, CP=4, head dim 128, bf16); "
          f"ring attention forward only: {_mib(ring)} MiB")
    print("| K | layer type | layers | tail | tail_grad | query | candidates | prefix | total MiB | / ring fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, v in pb["by_k"].items():
        for t in v["layer_types"]:
            kinds = " | ".join(_mib(t["bytes_by_kind"][kind]) for kind in KINDS)
            print(f"| {k} | {t['local_groups']} local + {t['retrieval_groups']} retrieval + {t['segment_groups']} "
                  f"segment | {len(t['layers'])} | {kinds} | {_mib(t['bytes'])} | 1/{1 / t['over_ring']:.0f} |")
        print(f"| {k} | mean over 32 layers | 32 | | | | | | {_mib(v['mean_bytes_per_layer'])} | "
              f"1/{1 / v['mean_over_ring']:.0f} |")
    mb = result.get("measured_bytes")
    if mb:
        print(f"\n   measured, {mb['cp']} ranks, T={mb['seq_length']}, head dim {mb['model']['head_dim']}, fp32 "
              f"(all equal to the formula: {mb['all_equal']})")
        print("| K | layer | groups (local/retrieval/segment) | measured bytes | formula bytes | equal |")
        print("|---|---|---|---|---|---|")
        for k, v in mb["by_k"].items():
            for row in v["layers"]:
                print(f"| {k} | {row['layer']} | {row['local_groups']}/{row['retrieval_groups']}/"
                      f"{row['segment_groups']} | {row['measured_total']} | {row['formula_total']} | {row['equal']} |")
    st = result.get("step_time")
    if st:
        print(f"\n2. step time, T={st['seq_length']}, median of {st['repeats']} (s)")
        print("| row | median wall s | / CP=1 baseline | median CPU s (slowest rank) | / CP=1 baseline |")
        print("|---|---|---|---|---|")
        for k in KS:
            r = st["ratios"][str(k)]
            base = st["median_seconds"][r["cp1_baseline"]]
            base_cpu = st["median_cpu_seconds"][r["cp1_baseline"]]
            for name, s in st["median_seconds"].items():
                if name.endswith(f"_k{k}"):
                    c = st["median_cpu_seconds"][name]
                    print(f"| {name} | {s:.2f} | {s / base:.2f} | {c:.2f} | {c / base_cpu:.2f} |")
        for name, per_rank in st["median_blocked_seconds_per_rank"].items():
            print(f"   {name}: seconds each rank waited for messages (median): "
                  + ", ".join(f"{w:.2f}" for w in per_rank))
    mem = result.get("memory")
    if mem:
        sizes = sorted({P for modes in mem["max_rank_step_peak_mib"].values() for P in modes}, key=int)
        print(f"\n3. peak memory of one step per rank (MiB, max over ranks), T={mem['seq_length']}")
        print("| mode | " + " | ".join(f"CP={P}" for P in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for mode, by in mem["max_rank_step_peak_mib"].items():
            print(f"| {mode} | " + " | ".join(f"{by[P]:.0f}" if P in by else "-" for P in sizes) + " |")


def plot(result: dict, path: str) -> bool:
    """Bytes per layer against ring attention, CP2 / CP1 step-time ratios and memory per rank
    against CP size, in one figure (False when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    pb = result["paper_bytes"]
    k1 = pb["by_k"]["1"]
    names = [f"{t['local_groups']}L+{t['retrieval_groups']}R" for t in k1["layer_types"]] + ["mean", "ring fwd",
                                                                                               "ring step ~3x"]
    values = [t["bytes"] for t in k1["layer_types"]] + [k1["mean_bytes_per_layer"],
                                                        pb["ring_forward_bytes_per_layer"],
                                                        pb["ring_step_bytes_per_layer_approx"]]
    ax = axes[0]
    ax.bar(names, [v / 2**20 for v in values], color=["C0"] * (len(values) - 2) + ["C3", "C3"])
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("MiB per layer per step (all ranks)")
    ax.set_title("bytes, paper setting (32K, S=4096, M=R=512, CP=4, bf16)", fontsize=9)
    runs = result.get("step_time_runs", {}).get("runs") or ([result["step_time"]] if "step_time" in result else [])
    if runs:
        ax = axes[1]
        labels = [r.get("run", str(i)) for i, r in enumerate(runs)]
        x = range(len(runs))
        for j, (k, key, style) in enumerate([("1", "cp2_over_cp1", "C0"), ("1", "cp2_over_cp1_cpu_seconds", "C9"),
                                             ("-1", "cp2_over_cp1", "C1"), ("-1", "cp2_over_cp1_cpu_seconds", "C8")]):
            ax.bar([i + 0.2 * j - 0.3 for i in x], [r["ratios"][k].get(key, float("nan")) for r in runs], 0.2,
                   color=style, label=f"K={k} {'CPU' if 'cpu' in key else 'wall'}")
        ax.axhline(0.65, color="k", ls="--", lw=1, label="target 0.65")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("CP=2 step / CP=1 step")
        ax.set_title(f"step time, {runs[0]['seq_length']} tokens, per run", fontsize=9)
        ax.legend(fontsize=7)
    if "memory" in result:
        ax = axes[2]
        for mode, by in result["memory"]["max_rank_step_peak_mib"].items():
            sizes = sorted(by, key=int)
            ax.plot([int(P) for P in sizes], [by[P] for P in sizes], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("CP size")
        ax.set_ylabel("step peak RSS per rank, MiB")
        ax.set_title("memory per rank", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_step_model_args(p: argparse.ArgumentParser) -> None:
    """The model and sequence of the step and memory measurements (shared with tools/bench_recompute.py)."""
    p.add_argument("--step-tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--tail", type=int, default=128)
    p.add_argument("--retrieval", type=int, default=128)
    p.add_argument("--long-range-layers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeats", type=int, default=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the machinery, not numbers")
    p.add_argument("--parts", nargs="+", default=["bytes", "steps", "memory"], choices=["bytes", "steps", "memory"])
    p.add_argument("--bytes-head-dim", type=int, default=4, help="head dim of the measured-bytes model")
    p.add_argument("--bytes-cp", type=int, default=PAPER["cp"], help="ranks of the measured-bytes run")
    add_step_model_args(p)
    p.add_argument("--memory-cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="also draw the results to this PNG (needs matplotlib)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from a results file")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            return 0 if plot(json.load(fh), args.plot or "cp.png") else 1
    t0 = time.perf_counter()
    result = {"env": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                      "threads_per_process": 1, "backend": "gloo (CPU)", "quick": args.quick,
                      "load_average_1min_start": os.getloadavg()[0]},
              "paper_bytes": paper_bytes()}
    if "bytes" in args.parts:
        result["measured_bytes"] = measure_bytes(args)
    if "steps" in args.parts:
        result["step_time"] = measure_steps(args)
    if "memory" in args.parts:
        result["memory"] = measure_memory(args)
    result["env"]["wall_seconds"] = time.perf_counter() - t0
    result["env"]["load_average_1min_end"] = os.getloadavg()[0]
    print_tables(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot and not plot(result, args.plot):
        print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
