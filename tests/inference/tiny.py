"""Tiny random segmented models for the inference tests."""
import torch

from megaseg.config import HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.models.llama import SegmentedLlamaForCausalLM

# Every mode in every position class: retrieval in layer 1, segment elsewhere, local rest.
PLAN = HeadPlan((("local", "segment"), ("retrieval", "local"), ("local", "segment")))


def tiny_model(seed=0, S=8, M=3, R=5, plan=PLAN, vocab=97, rope=None) -> SegmentedLlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=plan.num_layers, num_heads=4,
        num_kv_heads=plan.num_kv_groups, rope=rope or RopeConfig(theta=1000.0),
        segment=SegmentConfig(S, M, R if plan.has_retrieval() else 0, 1), head_plan=plan,
    )
    model = SegmentedLlamaForCausalLM(cfg).eval()
    # Larger than the 0.02 init so attention (and retrieval) is far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if ("q_proj" in name or "k_proj" in name or "embed" in name) else 0.1)
    return model


def random_ids(lengths, vocab, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
