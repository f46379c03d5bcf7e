"""Benchmark: activation recompute (`--recompute-granularity`) that keeps TBPTT-K exact, CPU, gloo.

One sequence of ``--step-tokens`` tokens (batch 1), TBPTT-1, the model of
``tools/bench_cp.py``'s step and memory measurements (hidden 128, 4 layers, 2 heads, S =
1024, M = R = 128, fp32), with each recompute setting beside no recompute, in one run:

* **peak memory of one step per rank**: the sequential engine on one process, and the
  context-parallel chunk path at CP = 1 and CP = 2 (one fresh spawn per mode). After a
  warm-up step of a mode, each rank resets its resident-set high-water mark, records its
  RSS and runs one step; the step's peak is ``VmHWM - RSS before``, max over ranks.
  glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_=65536``) so freed large blocks
  return to the system between modes.
* **step time**: in the CP = 2 spawn, every mode in turn per round (alternating order), one
  warm-up round, median over ``--repeats`` rounds of the slower rank's wall and CPU time.
* the losses of all modes (equal: recompute changes no value).

    python tools/bench_recompute.py --out docs/benchmarks/recompute.json
    python tools/bench_recompute.py --quick --out recompute_quick.json   # tiny: checks the machinery
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megaseg.parallel.context import ChunkLayout  # noqa: E402
from tools.bench_cp import (_done, _init, _model_dict, _sequential_step, _timed, _tokens,  # noqa: E402
                            add_step_model_args, fixed_mmap_threshold, step_model)
from tools.bench_tbptt import reset_peak, status_kib  # noqa: E402

SETTINGS = {
    "none": {},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
}
K = 1


def _build(cfg, setting: str):
    from megaseg.megatron.model import build_model

    torch.manual_seed(0)
    return build_model(cfg, use_te=False, config_overrides=SETTINGS[setting])


def _modes(world: int, cfg, T: int, settings):
    """(name, setting, step function factory) of this spawn."""
    from megaseg.training.chunk import chunk_backward

    S = cfg.segment.segment_length
    tokens, labels, n_pred = _tokens(cfg, T)
    layout = ChunkLayout(T, S, world)
    out = []
    for setting in settings:
        if world == 1:
            out.append((f"sequential/{setting}", setting, lambda m: _sequential_step(m, tokens, S, K)))
        out.append((f"chunk_cp{world}/{setting}", setting,
                    lambda m: chunk_backward(m, tokens, labels, layout, K, num_predicted=n_pred).loss))
    return out


def _modes_names(world: int, settings):
    names = [(f"sequential/{s}", s, None) for s in settings] if world == 1 else []
    return names + [(f"chunk_cp{world}/{s}", s, None) for s in settings]


def _memory_rank(rank, world, port, cfg, T, settings, only, out_dir):
    _init(rank, world, port, world)
    try:
        result = {}
        for name, setting, step in _modes(world, cfg, T, settings):
            if name != only:
                continue
            meg = _build(cfg, setting)
            step(meg)  # warm-up: gradient buffers allocated
            meg.zero_grad(set_to_none=False)
            gc.collect()
            dist.barrier()
            before = status_kib("VmRSS")
            reset_peak()
            loss = step(meg)
            peak = status_kib("VmHWM") - before
            got = [None] * world
            dist.all_gather_object(got, {"step_peak_mib": peak / 1024, "loss": loss})
            result[name] = got
            del meg
            gc.collect()
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        _done()


def _time_rank(rank, world, port, cfg, T, settings, repeats, out_dir):
    _init(rank, world, port, world)
    try:
        modes = [(name, _build(cfg, setting), step) for name, setting, step in _modes(world, cfg, T, settings)]
        times = {name: [] for name, *_ in modes}
        cpu = {name: [] for name, *_ in modes}
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, meg, step in (modes if round_ % 2 == 0 else modes[::-1]):
                meg.zero_grad()
                dist.barrier()
                seconds, cpu_s, _ = _timed(lambda: step(meg))
                mine = torch.tensor([seconds, cpu_s], dtype=torch.float64)
                gathered = [torch.zeros_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine)
                if round_:
                    times[name].append(max(g[0].item() for g in gathered))
                    cpu[name].append(max(g[1].item() for g in gathered))
        if rank == 0:
            torch.save({"times": times, "cpu": cpu}, os.path.join(out_dir, "result.pt"))
    finally:
        _done()


def _spawn(fn, world, *args):
    from megaseg.megatron.parallel import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(fn, args=(world, free_port(), *args, out_dir), nprocs=world, join=True)
        return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)


def measure(args) -> dict:
    cfg = step_model(args)
    T = 128 if args.quick else args.step_tokens
    settings = list(SETTINGS)
    with fixed_mmap_threshold():
        memory = {}
        for world in (1, 2):  # one fresh spawn per measured mode: no mode inherits another's heap
            for name, _, _ in _modes_names(world, settings):
                memory.update(_spawn(_memory_rank, world, cfg, T, settings, name))
        timing = _spawn(_time_rank, 2, cfg, T, settings, 1 if args.quick else args.repeats)
    rows = {}
    for name, ranks in memory.items():
        engine, setting = name.split("/")
        rows[name] = {"engine": engine, "recompute": setting, "step_peak_mib": max(r["step_peak_mib"] for r in ranks),
                      "losses": [r["loss"] for r in ranks]}
    med = {name: statistics.median(v) for name, v in timing["times"].items()}
    med_cpu = {name: statistics.median(v) for name, v in timing["cpu"].items()}
    base = "chunk_cp2/none"
    for name, row in rows.items():
        row["model_mib"] = predicted_mib(cfg, T, name)
        row["model_over_measured"] = row["model_mib"] / max(row["step_peak_mib"], 1e-9)
    ratios = {name: {"peak_over_none": rows[name]["step_peak_mib"]
                     / max(rows[name.split("/")[0] + "/none"]["step_peak_mib"], 1e-9)} for name in rows}
    for name in med:
        ratios[name].update(time_over_none=med[name] / med[base], cpu_over_none=med_cpu[name] / med_cpu[base])
    return {"model": _model_dict(cfg), "seq_length": T, "tbptt_k": K, "settings": SETTINGS, "rows": rows,
            "median_seconds": med, "median_cpu_seconds": med_cpu, "times": timing["times"], "cpu": timing["cpu"],
            "ratios": ratios, "load_average_1min": os.getloadavg()[0]}


def predicted_mib(cfg, T: int, name: str) -> float:
    """megaseg.training.memory_model's activations + transient for a measured row (the
    measurement excludes weights and gradients, allocated before the step)."""
    from megaseg.training.memory_model import TrainingLayout, predict_training_memory

    engine, setting = name.split("/")
    cp = int(engine[len("chunk_cp"):]) if engine.startswith("chunk") else 1
    layout = TrainingLayout(seq_length=T, tbptt_k=K, cp=cp, recompute=setting,
                            step_engine="chunk" if engine.startswith("chunk") else "sequential")
    est = predict_training_memory(cfg, layout)
    return (est.activations + est.transient) / 2**20


def census(cfg, T: int, setting: str, chunk: bool = True) -> float:
    """Bytes per token that autograd saves for the backward in one forward of T tokens
    (unique storages), on the chunk path (one rank) or, with ``chunk=False``, for one
    segment of the sequential engine after a first one (its carried state)."""
    from megaseg.megatron.model import segment_forward
    from megaseg.training import chunk as chunk_path
    from megaseg.training.tbptt import sum_cross_entropy

    meg = _build(cfg, setting)
    tokens, labels, _ = _tokens(cfg, T)
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    if chunk:
        piece = chunk_path.TrainingChunk.for_this_rank(ChunkLayout(T, cfg.segment.segment_length, 1), K)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if chunk_path.recomputes_output_layer(meg):
                nll = chunk_path._checkpointed_nll(meg, tokens, labels, piece)
            else:
                nll = chunk_path._token_nll(chunk_path.context_parallel_forward(meg, tokens, piece), labels)
        piece.backward(nll.sum())
        return sum(seen.values()) / T
    S = cfg.segment.segment_length
    with torch.no_grad():
        _, states = segment_forward(meg, tokens[:, :S], None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = segment_forward(meg, tokens[:, S : 2 * S], states)
        sum_cross_entropy(out, labels[:, S : 2 * S])
    return sum(seen.values()) / S


def print_table(result: dict) -> None:
    print(f"\nTBPTT-{result['tbptt_k']}, {result['seq_length']} tokens, batch 1; peak per rank (MiB) of one step")
    print("| engine | recompute | step peak MiB | memory model MiB | model / measured | / no recompute | CP2 step s | "
          "/ no recompute (wall, CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in result["rows"].items():
        r = result["ratios"][name]
        t = result["median_seconds"].get(name)
        timing = (f"{t:.2f} | {r['time_over_none']:.2f}, {r['cpu_over_none']:.2f}" if t is not None else "- | -")
        print(f"| {row['engine']} | {row['recompute']} | {row['step_peak_mib']:.0f} | {row['model_mib']:.0f} | "
              f"{row['model_over_measured']:.2f} | {r['peak_over_none']:.2f} | "
              f"{timing} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the machinery, not numbers")
    add_step_model_args(p)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = measure(args)
    print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
