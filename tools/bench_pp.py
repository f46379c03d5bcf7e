"""Benchmark: pipeline-parallel step time and bubble, PP2 (two processes) against PP1 (one).

For each number of segments per sequence, one run measures side by side: the same model
and batches trained ``--steps`` steps at pipeline size 1 (one process, the sequential TBPTT
engine) and at pipeline size 2 (two processes, the windows engine of
megaseg.training.pipeline on megatron's 1F1B schedule), each process on one CPU thread
(gloo). Also at pipeline size 1: the windows engine itself, which shows its cost of K
extra segment forwards per segment apart from the pipeline.

Every run starts from the same initial weights (the losses agree to float rounding).
Recorded: the fastest step time of the steps after the first (a step lasts as long as its
slowest rank; the fastest is the least disturbed by other load on a shared machine), the
ratio PP2 / PP1, and the bubble fraction of each stage = the time the stage spends inside
megatron's pipeline p2p calls (recv/send of activations and gradients, waiting for the
other stage included) / its step time, next to the 1F1B ideal (p - 1) / (m + p - 1) for p
stages and m pipeline micro-batches (m = data micro-batches x segments).

    python tools/bench_pp.py --segments 4 8 16 --out docs/benchmarks/pp.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaseg.megatron import parallel  # noqa: E402

MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=384,
             vocab_size=512, tail_length=8, retrieval_length=8, tbptt_k=1, long_range_layers=[1, 3],
             micro_batch_size=1, global_batch_size=4)
P2P_METHODS = ("recv_forward", "recv_backward", "send_forward", "send_backward", "send_forward_recv_backward",
               "send_backward_recv_forward")


def _time_p2p(counter: list) -> None:
    """Add the seconds spent in every pipeline p2p call of megatron's schedule to counter[0]."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    for name in P2P_METHODS:
        original = getattr(P2PCommunicator, name)

        @functools.wraps(original)
        def timed(self, *args, _original=original, **kwargs):
            t = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter[0] += time.perf_counter() - t

        setattr(P2PCommunicator, name, timed)


def _windows_step(model, optimizer, scheduler, batches, cfg):
    """train_step with the windows engine at pipeline size 1."""
    from megatron.core.distributed import finalize_model_grads

    from megaseg.training import pipeline

    model.zero_grad_buffer()
    optimizer.zero_grad()
    nll, *_ = pipeline.forward_backward(model, batches, cfg, False)
    finalize_model_grads([model])
    optimizer.step()
    scheduler.step(increment=cfg.global_batch_size)
    return nll


def _rank(rank, port, out_dir, world, segments, segment_length, steps, modes, weights_path):
    torch.set_num_threads(1)
    parallel.initialize_model_parallel(pp=world, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                       world_size=world, timeout_s=300)
    from megaseg.training.arguments import PretrainConfig
    from megaseg.training.batches import rank_microbatches
    from megaseg.megatron.convert import megatron_to_reference
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer
    from tests.training.synthetic import PatternDataset

    T = segments * segment_length
    data = PatternDataset(64, T, seed=0)
    p2p = [0.0]
    _time_p2p(p2p)
    result = {}
    try:
        for mode in modes:
            cfg = PretrainConfig(**MODEL, seq_length=T, segment_length=segment_length, pipeline_model_parallel_size=world,
                                 train_iters=steps, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, save=None,
                                 save_interval=None, tensorboard_dir=None, eval_iters=0, bf16=False)
            mc = cfg.model_config(MODEL["vocab_size"])
            if not os.path.exists(weights_path):  # the first (one-process) run fixes the initial weights
                model, _, _ = setup_model_and_optimizer(cfg, mc)
                torch.save(megatron_to_reference([model.module.state_dict()], mc), weights_path)
            model, optimizer, scheduler = setup_model_and_optimizer(cfg, mc, torch.load(weights_path))
            times, waits, losses = [], [], []
            for it in range(steps):
                batches = rank_microbatches(data, it * cfg.global_batch_size, cfg)
                p2p[0] = 0.0
                t = time.perf_counter()
                if mode == "windows":
                    losses.append(_windows_step(model, optimizer, scheduler, batches, cfg))
                else:
                    losses.append(train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, batches).loss)
                times.append(time.perf_counter() - t)
                waits.append(p2p[0])
            result[mode] = {"step_s": times[1:], "p2p_s": waits[1:], "losses": losses}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel.destroy_model_parallel()


def _spawn(world, segments, args, modes, weights_path):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(parallel.free_port(), out_dir, world, segments, args.segment_length, args.steps, modes,
                              weights_path), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _fastest(step_times: list[list[float]]) -> float:
    """The fastest step (a step lasts as long as its slowest rank): the least disturbed by other load."""
    return min(max(per_rank) for per_rank in zip(*step_times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, nargs="+", default=[4, 8, 16], help="segments per sequence")
    p.add_argument("--segment-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per measurement (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="PP1 / PP2 measurements alternated this many times")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in args.segments:
        with tempfile.TemporaryDirectory() as tmp:
            weights = os.path.join(tmp, "weights.pt")
            for round_ in range(args.rounds):  # PP1 and PP2 alternate; timed steps of all rounds are pooled
                one = _spawn(1, n, args, ("sequential", "windows"), weights)[0]
                two = _spawn(2, n, args, ("pipeline",), weights)
                if round_ == 0:
                    pp1, pp2 = one, two
                    continue
                for mode in one:
                    for key in ("step_s", "p2p_s"):
                        pp1[mode][key] += one[mode][key]
                for r, r_new in zip(pp2, two):
                    for key in ("step_s", "p2p_s"):
                        r["pipeline"][key] += r_new["pipeline"][key]
        seq_s = _fastest([pp1["sequential"]["step_s"]])
        win_s = _fastest([pp1["windows"]["step_s"]])
        pp2_s = _fastest([r["pipeline"]["step_s"] for r in pp2])
        # per stage: p2p time / step time of its fastest step, and the median over the timed steps
        bubble = [min(r["pipeline"]["step_s"]) for r in pp2]
        bubble = [r["pipeline"]["p2p_s"][r["pipeline"]["step_s"].index(t)] / t for r, t in zip(pp2, bubble)]
        bubble_median = [statistics.median(w / s for w, s in zip(r["pipeline"]["p2p_s"], r["pipeline"]["step_s"]))
                         for r in pp2]
        m = (MODEL["global_batch_size"] // MODEL["micro_batch_size"]) * n
        row = {
            "segments": n,
            "seq_length": n * args.segment_length,
            "pipeline_microbatches": m,
            "pp1_sequential_step_s": seq_s,
            "pp1_windows_step_s": win_s,
            "pp2_step_s": pp2_s,
            "pp2_over_pp1": pp2_s / seq_s,
            "bubble_fraction_per_stage": bubble,
            "bubble_fraction_per_stage_median": bubble_median,
            "bubble_fraction_ideal_1f1b": 1 / (m + 1),
            "step_s_all": {"sequential": pp1["sequential"]["step_s"], "windows": pp1["windows"]["step_s"],
                           "pp2_per_rank": [r["pipeline"]["step_s"] for r in pp2]},
            "max_loss_rel_diff_pp2_vs_pp1": max(abs(a - b) / abs(b) for a, b in
                                                zip(pp2[-1]["pipeline"]["losses"], pp1["sequential"]["losses"])),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| segments | T | pipeline micro-batches | PP1 step (s) | PP1 windows step (s) | PP2 step (s) | PP2 / PP1 "
          "| bubble stage 0 / 1 | ideal 1F1B bubble |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bubble_fraction_per_stage"]
        print(f"| {r['segments']} | {r['seq_length']} | {r['pipeline_microbatches']} | {r['pp1_sequential_step_s']:.3f} "
              f"| {r['pp1_windows_step_s']:.3f} | {r['pp2_step_s']:.3f} | {r['pp2_over_pp1']:.2f} "
              f"| {b[0]:.2f} / {b[1]:.2f} | {r['bubble_fraction_ideal_1f1b']:.3f} |")
    if args.out:
        meta = {"model": MODEL, "segment_length": args.segment_length, "steps": args.steps, "rounds": args.rounds,
                "device": "cpu (gloo), 1 thread per process", "torch": torch.__version__,
                "step_time": "fastest timed step (steps after the first; a step lasts as long as its slowest rank)",
                "bubble": "time a stage spends inside megatron's p2p send/recv calls (waiting included) / its step "
                          "time, in its fastest step (and the median over the timed steps)"}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
