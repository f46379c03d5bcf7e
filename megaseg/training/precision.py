"""Numeric precision of a training run: whether bf16 autocast is available, wanted, and the context that applies it."""
from __future__ import annotations

import contextlib

import torch

from megaseg.config import ConfigError


def bf16_supported() -> bool:
    """bf16 autocast with native hardware support: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_bf16(requested: bool | None) -> bool:
    """None (auto) -> bf16 on CUDA when supported; on CPU fp32 (faster at small sizes).

    Explicit True on hardware without bf16 support is a ConfigError.
    """
    if requested is None:
        return torch.cuda.is_available() and bf16_supported()
    if requested and not bf16_supported():
        raise ConfigError("bf16=True is invalid: this machine has no native bf16 support; use --no-bf16")
    return bool(requested)


def autocast_context(bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
