"""Benchmark: per-rank optimizer state and step time, replicated vs sharded optimizer state.

For each data-parallel size, DP gloo ranks (CPU, one thread each) build the same small
model and train ``--steps`` steps with the replicated optimizer, then with
``--use-distributed-optimizer``, then (when deepspeed imports) with DeepSpeed ZeRO-1 and
ZeRO-2. Recorded per rank: optimizer-state bytes after the last
step (`megaseg.training.setup.optimizer_state_bytes`: Adam moments and step counts; fp32
parameters are their own main copies), and the median wall time of the steps after the
first. Losses of the two runs are recorded too (they agree to float rounding).

    python tools/bench_distributed_optimizer.py --dp 1 2 4 --out docs/benchmarks/distributed_optimizer.json
"""
from __future__ import annotations

import argparse
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
             vocab_size=512, seq_length=64, segment_length=16, tail_length=4, retrieval_length=8, tbptt_k=1,
             long_range_layers=[1, 3], micro_batch_size=1, global_batch_size=4)


def _rank(rank, world, port, steps, out_dir, deepspeed_configs):
    torch.set_num_threads(1)
    parallel.initialize_model_parallel(tp=1, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                       timeout_s=300)
    from megaseg.training.arguments import PretrainConfig
    from megaseg.training.batches import rank_microbatches
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import optimizer_state_bytes, setup_model_and_optimizer
    from tests.training.synthetic import PatternDataset

    data = PatternDataset(64, MODEL["seq_length"], seed=0)
    result = {}
    modes = [("replicated", {}), ("distributed", {"use_distributed_optimizer": True})]
    if deepspeed_configs:
        modes += [(f"zero{stage}", {"deepspeed": True, "deepspeed_config": path})
                  for stage, path in deepspeed_configs.items()]
    try:
        for mode, flags in modes:
            cfg = PretrainConfig(**MODEL, train_iters=steps, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, save=None,
                                 save_interval=None, tensorboard_dir=None, eval_iters=0, bf16=False, **flags)
            model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(MODEL["vocab_size"]))
            times, losses = [], []
            for it in range(steps):
                batches = rank_microbatches(data, it * cfg.global_batch_size, cfg)
                t = time.perf_counter()
                losses.append(train_step(select_engine(cfg, model, bf16=False), optimizer, scheduler, batches).loss)
                times.append(time.perf_counter() - t)
            result[mode] = {
                "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                "step_seconds_median": statistics.median(times[1:]),
                "losses": losses,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel.destroy_model_parallel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        deepspeed = None
    rows = []
    for dp in args.dp:
        with tempfile.TemporaryDirectory() as out_dir:
            configs = {}
            if deepspeed is not None:
                for stage in (1, 2):
                    configs[stage] = os.path.join(out_dir, f"ds{stage}.json")
                    with open(configs[stage], "w") as fh:
                        json.dump({"zero_optimization": {"stage": stage}}, fh)
            mp.spawn(_rank, args=(dp, parallel.free_port(), args.steps, out_dir, configs), nprocs=dp, join=True)
            ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(dp)]
        rep = ranks[0]["replicated"]
        row = {
            "dp": dp,
            "parameters": rep["parameters"],
            "replicated_bytes_per_rank": [r["replicated"]["optimizer_state_bytes"] for r in ranks],
            "distributed_bytes_per_rank": [r["distributed"]["optimizer_state_bytes"] for r in ranks],
            "replicated_step_s": max(r["replicated"]["step_seconds_median"] for r in ranks),
            "distributed_step_s": max(r["distributed"]["step_seconds_median"] for r in ranks),
            "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(rep["losses"], ranks[0]["distributed"]["losses"])),
        }
        row["distributed_over_replicated_bytes"] = max(row["distributed_bytes_per_rank"]) / row["replicated_bytes_per_rank"][0]
        for mode in ("zero1", "zero2"):
            if mode in ranks[0]:
                row[f"{mode}_bytes_per_rank"] = [r[mode]["optimizer_state_bytes"] for r in ranks]
                row[f"{mode}_step_s"] = max(r[mode]["step_seconds_median"] for r in ranks)
                row[f"{mode}_max_loss_rel_diff"] = max(
                    abs(a - b) / abs(a) for a, b in zip(rep["losses"], ranks[0][mode]["losses"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        meta = {"model": MODEL, "steps": args.steps, "device": "cpu (gloo), 1 thread per rank",
                "torch": torch.__version__}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
