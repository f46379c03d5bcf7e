"""A tiny in-memory dataset with GPTDataset's sample format, tiny run settings, and spawned ranks."""
from pathlib import Path

import torch

from megaseg.training.arguments import PretrainConfig

VOCAB = 64


class PatternDataset:
    """Samples {"tokens", "labels"} of `seq_length` tokens; each repeats a random 8-token
    pattern, so a model can learn it within a few steps."""

    def __init__(self, num_samples: int, seq_length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randint(0, VOCAB, (num_samples, 8), generator=g)
        reps = (seq_length + 1) // 8 + 1
        self.data = pattern.repeat(1, reps)[:, : seq_length + 1]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x = self.data[i]
        return {"tokens": x[:-1].clone(), "labels": x[1:].clone(), "loss_mask": torch.ones(len(x) - 1)}


def tiny_config(tmp_path=None, **overrides) -> PretrainConfig:
    """Two layers, hidden 32, 4 segments of 8 tokens; no files unless tmp_path is given."""
    values = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=VOCAB, seq_length=32, segment_length=8, tail_length=4, retrieval_length=4, tbptt_k=1,
        long_range_layers=[1], num_long_range_heads=1, micro_batch_size=2, global_batch_size=4,
        train_iters=4, lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, log_interval=1, eval_interval=2, eval_iters=1,
        save=None, save_interval=None, tensorboard_dir=None, bf16=False,
    )
    if tmp_path is not None:
        values.update(save=str(tmp_path / "ckpt"), tensorboard_dir=str(tmp_path / "tb"))
    values.update(overrides)
    return PretrainConfig(**values)


def spawn_ranks(rank_fn, tmp_path_factory, name: str, nprocs: int = 2) -> tuple[list, Path]:
    """Run ``rank_fn(rank, port, out_dir)`` in ``nprocs`` spawned gloo ranks; each saves
    ``out_dir/rank<r>.pt``. Returns (the ranks' saved results, out_dir)."""
    import torch
    import torch.multiprocessing as mp

    from megaseg.megatron.parallel import free_port

    out_dir = tmp_path_factory.mktemp(name)
    mp.spawn(rank_fn, args=(free_port(), out_dir), nprocs=nprocs, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nprocs)], out_dir


def rel_close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))
