"""Small random models shared by the tests."""
import random

import torch

from megaseg.config import MODES, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.models.llama import SegmentedLlamaForCausalLM


def random_plan(num_layers: int, num_kv: int, seed: int) -> HeadPlan:
    """A plan mixing all three modes (each mode appears at least once)."""
    rng = random.Random(seed)
    while True:
        plan = HeadPlan(tuple(tuple(rng.choice(MODES) for _ in range(num_kv)) for _ in range(num_layers)))
        if all(plan.count(m) for m in MODES):
            return plan


def tiny_model(seed=0, num_layers=3, num_heads=4, num_kv_heads=2, S=8, M=3, R=5, k=1, vocab=96,
               dtype=torch.float32, plan=None, rope=None, tie=False) -> SegmentedLlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=8 * num_heads, intermediate_size=40, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, tie_word_embeddings=tie,
        rope=rope or RopeConfig(theta=1000.0), segment=SegmentConfig(S, M, R, k),
        head_plan=plan or random_plan(num_layers, num_kv_heads, seed),
    )
    model = SegmentedLlamaForCausalLM(cfg).to(dtype)
    # Larger attention weights than the 0.02 init so attention patterns (and retrieval)
    # are not flat; logits stay O(1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if ("q_proj" in name or "k_proj" in name or "embed" in name) else 0.1)
    return model
