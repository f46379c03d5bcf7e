"""The compute boundary of the segmented operator: attention kernels.

`SegmentedAttention` plans (access modes, prefixes, state transitions) and hands the
arithmetic to a kernel through one small interface: a `SegmentBatch` (un-rotated segment
queries/keys/values, a per-KV-group prefix, its valid lengths, the query offset) goes in,
the attention output comes out. Positions follow docs/semantics.md §3 and are implied by the
batch: in segment n and KV group g, prefix slot p sits at position p, segment key t at
prefix_len[n, g] + t and query a at prefix_len[n, g] + q_offset + a. Every query attends to
the valid prefix slots of its group (p < prefix_len[n, g]) and causally to its segment's
keys (t <= q_offset + a). A kernel is one new file implementing ``attend(batch, rotary)``;
context parallelism wraps the same boundary.

Kernels:

* ``sdpa``   — torch's scaled_dot_product_attention with explicit masks; the reference,
  runs on any device and dtype.
* ``triton`` — a fused Triton kernel (RoPE, GQA, prefix and causal masks in the kernel,
  forward and backward); CUDA, or CPU under Triton's interpreter (``TRITON_INTERPRET=1``
  set before triton is imported).
* ``auto``   — ``triton`` for CUDA tensors of fp16/bf16/fp32 when triton imports, ``sdpa``
  otherwise.

Decode (one new token per row, no gradient) does not cross this boundary: the operator
keeps the open segment's rotated keys in preallocated buffers and runs one torch
``scaled_dot_product_attention`` call per layer over them (`SegmentedAttention.decode`,
`SegmentedAttention.decode_rows`, in `megaseg.ops.decode`), on any device; kernels serve
runs of tokens (training, prefill).

The process-wide default is ``auto``; ``MEGASEG_ATTENTION_KERNEL`` overrides it at import,
`set_default` at run time (``pretrain_gpt.py --attention-kernel``), and an operator built
with ``kernel=...`` uses its own choice. The choice never changes results beyond
floating-point tolerance and is not part of any checkpoint.

Shape legend: B batch, N segments, Q queries per segment, K = q_offset + Q segment keys,
P prefix slots, H query heads, G KV groups (H = G * heads per group), D head dim.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

KERNELS = ("auto", "sdpa", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SegmentBatch:
    """One kernel call: N segments of B sequences, all KV groups of a layer.

    q:          [B, N, Q, H, D] un-rotated queries; query a is at offset q_offset + a of its segment.
    k, v:       [B, N, K, G, D] un-rotated keys/values of the segment up to the last query.
    prefix_k/v: [B, N, P, G, D] un-rotated prefix (carried tail or retrieved tokens, per
                group), or None when no segment has one.
    prefix_len: [N, G] valid prefix slots of each segment and group (long, <= P).
    q_offset:   offset of the first query inside its segment (0 unless a run continues an
                open segment).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor | None
    prefix_v: torch.Tensor | None
    prefix_len: torch.Tensor
    q_offset: int = 0

    def __post_init__(self):
        B, N, Q, H, D = self.q.shape
        if self.k.shape[:2] != (B, N) or self.k.shape[4] != D or self.k.shape != self.v.shape:
            raise ValueError(f"q {tuple(self.q.shape)} and k/v {tuple(self.k.shape)}/{tuple(self.v.shape)} disagree")
        G = self.k.shape[3]
        if H % G:
            raise ValueError(f"{H} query heads are not a multiple of {G} KV groups")
        if self.k.shape[2] != self.q_offset + Q:
            raise ValueError(f"{self.k.shape[2]} segment keys for {Q} queries at offset {self.q_offset}")
        if tuple(self.prefix_len.shape) != (N, G):
            raise ValueError(f"prefix_len {tuple(self.prefix_len.shape)} must be [N={N}, G={G}]")
        if (self.prefix_k is None) != (self.prefix_v is None):
            raise ValueError("prefix_k and prefix_v come together")
        if self.prefix_k is not None and (
            self.prefix_k.shape != self.prefix_v.shape
            or self.prefix_k.shape[:2] != (B, N)
            or self.prefix_k.shape[3:] != (G, D)
        ):
            raise ValueError(f"prefix {tuple(self.prefix_k.shape)} must be [B, N, P, G={G}, D={D}]")

    @property
    def prefix_slots(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[2]

    @property
    def heads_per_group(self) -> int:
        return self.q.shape[3] // self.k.shape[3]


AttentionKernel = Callable[[SegmentBatch, "torch.nn.Module"], torch.Tensor]


def _check_name(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"attention kernel {name!r} is invalid: allowed {', '.join(KERNELS)}")
    return name


_default = _check_name(os.environ.get("MEGASEG_ATTENTION_KERNEL", "auto"))


def set_default(name: str) -> None:
    """Set the process-wide kernel used by operators built without ``kernel=``."""
    global _default
    _default = _check_name(name)


def get_default() -> str:
    return _default


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the Triton kernel takes this dtype and head dim."""
    return dtype in _TRITON_DTYPES and head_dim <= 256 and head_dim % 2 == 0


def choose(name: str | None, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The concrete kernel (``sdpa`` or ``triton``) that ``name`` (None: the process
    default) selects for tensors of this device type, dtype and head dim.

    ``auto`` falls back to ``sdpa`` off CUDA, without triton, or for a dtype/head dim the
    Triton kernel does not take; an explicit ``triton`` that cannot run is an error.
    """
    name = _check_name(name or _default)
    if name == "auto":
        use = device_type == "cuda" and triton_available() and triton_supports(dtype, head_dim)
        return "triton" if use else "sdpa"
    if name == "triton":
        if not triton_available():
            raise ImportError(
                "attention kernel 'triton' needs the triton package, which is not installed; "
                "pip install triton, or select the 'sdpa' (or 'auto') kernel"
            )
        if not triton_supports(dtype, head_dim):
            raise ValueError(
                f"the Triton kernel takes fp16/bf16/fp32 and an even head dim <= 256, got "
                f"{dtype} and head dim {head_dim}; select the 'sdpa' kernel"
            )
    return name


def resolve(name: str | None, batch: SegmentBatch) -> str:
    """`choose` for the tensors of ``batch``."""
    return choose(name, batch.q.device.type, batch.q.dtype, batch.q.shape[-1])


def get_kernel(name: str) -> AttentionKernel:
    """The ``attend(batch, rotary)`` function of a concrete kernel."""
    if name == "sdpa":
        from megaseg.ops.kernels.sdpa import attend
    elif name == "triton":
        from megaseg.ops.kernels.triton_segmented import attend
    else:
        raise ValueError(f"attention kernel {name!r} is not a concrete kernel: use 'sdpa' or 'triton'")
    return attend


def attend(batch: SegmentBatch, rotary, kernel: str | None = None) -> torch.Tensor:
    """Run ``batch`` through the kernel ``kernel`` selects (None: the process default)."""
    return get_kernel(resolve(kernel, batch))(batch, rotary)
