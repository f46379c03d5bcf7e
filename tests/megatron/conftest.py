"""Shared fixtures for the megatron-core integration tests (single gloo process)."""
import random

import pytest
import torch

from megaseg.config import LOCAL, MODES, HeadPlan, ModelConfig, SegmentConfig


def random_head_plan(num_layers: int, num_kv_groups: int, seed: int) -> HeadPlan:
    """A random plan that uses every mode and gives each half of the groups a `local` group."""
    rng = random.Random(seed)
    half = num_kv_groups // 2
    while True:
        modes = tuple(tuple(rng.choice(MODES) for _ in range(num_kv_groups)) for _ in range(num_layers))
        flat = [m for layer in modes for m in layer]
        halves_local = all(any(LOCAL in layer[s : s + half] for layer in modes) for s in (0, half))
        if set(flat) == set(MODES) and halves_local:
            return HeadPlan(modes)


def make_config(tied: bool = False) -> ModelConfig:
    """Tiny GQA model: 8 query heads over 4 KV groups, head_dim * heads != hidden, vocab not padded-aligned."""
    return ModelConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=64,
        num_layers=3,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        tie_word_embeddings=tied,
        segment=SegmentConfig(segment_length=8, tail_length=3, retrieval_length=4, tbptt_k=1),
        head_plan=random_head_plan(3, 4, seed=7),
    )


@pytest.fixture(scope="module")
def model_parallel():
    """megatron parallel state for one gloo process (TP = PP = 1), set up per test module."""
    from megaseg.megatron import parallel

    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    yield
    parallel.destroy_model_parallel()


@pytest.fixture
def tokens():
    """Batch of 2 sequences, T = 21 > S = 8: segments of 8, 8 and an uneven 5."""
    return torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def make_cfg():
    return make_config
