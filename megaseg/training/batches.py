"""Which samples each rank trains on, as tensors on its device, and the data-parallel sums of what it measured.

Global batch n is samples [n * G, (n + 1) * G) of the dataset; data-parallel rank d takes
the d-th contiguous share of it, cut into micro-batches. Every pipeline stage of a
data-parallel rank reads the same samples (the first stage needs the tokens, the last the
labels).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaseg.config import ConfigError


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def compute_device() -> torch.device:
    """Where batches and collective buffers live: this rank's GPU, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def context_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the data x context-parallel ranks (float64): each
    holds its part of the global batch (context-parallel ranks: their chunks of it)."""
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    if dist.is_initialized() and data_parallel_size() * context_parallel_size() > 1:
        from megatron.core import parallel_state

        dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return t.tolist()


def get_batch(dataset, first_sample: int, count: int, seq_length: int):
    """tokens [count, T] and labels [count, T] (-100 where the loss is masked) of samples
    first_sample .. first_sample + count - 1 (wrapping around the dataset)."""
    tokens, labels = [], []
    n = len(dataset)
    for i in range(first_sample, first_sample + count):
        sample = dataset[i % n]
        t, lab = sample["tokens"], sample["labels"]
        if "loss_mask" in sample:
            lab = lab.masked_fill(sample["loss_mask"] == 0, -100)
        tokens.append(torch.as_tensor(t, dtype=torch.long))
        labels.append(torch.as_tensor(lab, dtype=torch.long))
    tokens_BT, labels_BT = torch.stack(tokens).to(compute_device()), torch.stack(labels).to(compute_device())
    if tokens_BT.shape[1] != seq_length:
        raise ConfigError(
            f"seq_length={seq_length} is invalid: the dataset yields sequences of {tokens_BT.shape[1]} tokens"
        )
    return tokens_BT, labels_BT


def rank_microbatches(dataset, consumed: int, cfg):
    """This DP rank's micro-batches of the global batch that starts at sample ``consumed``
    (``cfg``: a PretrainConfig)."""
    per_rank = cfg.global_batch_size // data_parallel_size()
    start = consumed + data_parallel_rank() * per_rank
    return [
        get_batch(dataset, start + m, cfg.micro_batch_size, cfg.seq_length)
        for m in range(0, per_rank, cfg.micro_batch_size)
    ]
