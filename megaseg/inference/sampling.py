"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Shape legend: B batch, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaseg.config import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits.

    temperature  0 = greedy (argmax, ties to the lower token id); > 0 divides the logits.
    top_k        keep the k most likely tokens (0 = off). Applied after temperature.
    top_p        keep the smallest set of most likely tokens whose probability reaches
                 top_p (1.0 = off). Applied after top_k, as Hugging Face does.
    seed         seed of the sampling generator (None = nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r} is invalid: must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} is invalid: must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r} is invalid: must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def filter_logits(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """fp32 logits after temperature, top-k and top-p; removed tokens are -inf."""
    logits = logits_BV.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] (int64) for the last-position logits [B, V]."""
    if cfg.greedy:
        return logits_BV.float().argmax(-1)
    probs = filter_logits(logits_BV, cfg).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits_BV.device)
