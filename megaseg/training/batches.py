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
from megaseg.data.documents import document_spans


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
    (``cfg``: a PretrainConfig). With document reset (``cfg.reset_attention_mask``) they are
    its documents, one per row (`document_microbatches`)."""
    per_rank = cfg.global_batch_size // data_parallel_size()
    start = consumed + data_parallel_rank() * per_rank
    batches = [
        get_batch(dataset, start + m, cfg.micro_batch_size, cfg.seq_length)
        for m in range(0, per_rank, cfg.micro_batch_size)
    ]
    if getattr(cfg, "reset_attention_mask", False):
        batches = document_microbatches(batches, eod_of(dataset), cfg.micro_batch_size)
    return batches


def eod_of(dataset) -> int:
    """The end-of-document id of a megatron GPT dataset (its tokenizer's eod)."""
    tokenizer = getattr(getattr(dataset, "config", None), "tokenizer", None)
    eod = getattr(tokenizer, "eod", None)
    if eod is None:
        raise ConfigError("reset_attention_mask=True is invalid for this dataset: its tokenizer names no eod token")
    return int(eod)


def document_microbatches(microbatches, eod: int, rows: int, pad_id: int = 0):
    """Packed samples -> documents as rows (docs/semantics.md, documents).

    A document ends with an EOD (the sample's first document may have begun in the previous
    sample, its last may go on in the next: each is a document here). Each becomes a row of
    the sample's length starting at position 0, so the segmented engines run it from an
    empty state (no tail, no pool, positions from 0) exactly as if alone; a row's padding
    comes after its tokens and has no labels, so it changes no logit or loss. Labels travel
    with their tokens (the EOD still predicts the next document's first token unless
    ``eod_mask_loss`` masked it). Rows are regrouped ``rows`` at a time (the last group
    filled with empty rows), so every micro-batch keeps the shape [rows, T] that the
    pipeline and context-parallel engines exchange; their number varies with the data.
    """
    docs_t, docs_l = [], []
    for tokens_BT, labels_BT in microbatches:
        T = tokens_BT.shape[1]
        for t, lab in zip(tokens_BT, labels_BT):
            for s, e in document_spans(t, eod):
                row_t = t.new_full((T,), pad_id)
                row_l = lab.new_full((T,), -100)
                row_t[: e - s] = t[s:e]
                row_l[: e - s] = lab[s:e]
                docs_t.append(row_t)
                docs_l.append(row_l)
    while len(docs_t) % rows:
        docs_t.append(docs_t[0].new_full(docs_t[0].shape, pad_id))
        docs_l.append(docs_l[0].new_full(docs_l[0].shape, -100))
    return [(torch.stack(docs_t[i : i + rows]), torch.stack(docs_l[i : i + rows])) for i in range(0, len(docs_t), rows)]
