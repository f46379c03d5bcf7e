"""Overhead of recording segment statistics (--log-segment-stats-interval) on a training step.

    python tools/bench_segment_stats.py --out docs/benchmarks/segment_stats.json

Runs the default pretraining model (4 layers, hidden 256, S = 512, M = R = 64, 2048-token
sequences, 2 micro-batches of 2) on random tokens and times one optimizer step with and
without statistics, alternating, in one process with one thread; reports the fastest of
each. Statistics cover one micro-batch of the step, as in pretraining.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from megaseg.megatron import parallel
    from megaseg.training.arguments import PretrainConfig
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer

    torch.set_num_threads(1)
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    cfg = PretrainConfig(vocab_size=4096, save=None, tensorboard_dir=None)
    model_config = cfg.model_config(4096)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 4096, (2, 2048), generator=g),) * 1 for _ in range(2)]
    batches = [(t, torch.roll(t, -1, 1)) for (t,) in batches]
    times = {False: [], True: []}
    engine = select_engine(cfg, model, False)
    train_step(engine, optimizer, scheduler, batches)  # warm-up
    for _ in range(args.repeats):
        for with_stats in (False, True):
            t = time.perf_counter()
            train_step(engine, optimizer, scheduler, batches, record_stats=with_stats)
            times[with_stats].append(time.perf_counter() - t)
    plain, recorded = min(times[False]), min(times[True])
    result = {"step_s_without": plain, "step_s_with_stats": recorded, "overhead": recorded / plain - 1,
              "interval_default": cfg.log_segment_stats_interval,
              "amortized_overhead_at_default_interval": (recorded / plain - 1) / cfg.log_segment_stats_interval,
              "all_times": {"without": times[False], "with": times[True]}}
    print(f"| step without statistics | with statistics | overhead of a recorded step | averaged over "
          f"--log-segment-stats-interval {cfg.log_segment_stats_interval} |")
    print("|---|---|---|---|")
    print(f"| {plain:.2f} s | {recorded:.2f} s | {100 * result['overhead']:.1f}% | "
          f"{100 * result['amortized_overhead_at_default_interval']:.2f}% |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    parallel.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
