"""RMSNorm as the reference model computes it (Llama's): statistics in fp32, the weight
applied in the input dtype. The reference model (`megaseg.models.llama`) and megatron's
local layer spec (`megaseg.megatron.norm`) both use this one module."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
