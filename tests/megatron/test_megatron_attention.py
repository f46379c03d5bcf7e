"""SegmentedCoreAttention: the tensor-parallel slice of the head plan it runs."""
from types import SimpleNamespace

import pytest
import torch

from megaseg.config import ConfigError
from megaseg.megatron.attention import SegmentedCoreAttention
from megaseg.megatron.model import transformer_config_from

pytestmark = pytest.mark.usefixtures("model_parallel")


class _Group:
    """Stand-in for a process group of a given size, seen from one rank."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _core(cfg, layer_number, tp_rank, tp_size):
    pgs = SimpleNamespace(tp=_Group(tp_rank, tp_size), cp=_Group(0, 1))
    return SegmentedCoreAttention(
        transformer_config_from(cfg), layer_number, pg_collection=pgs, model_config=cfg
    )


def test_each_tp_rank_runs_its_contiguous_slice_of_kv_groups(make_cfg):
    cfg = make_cfg()
    for layer in range(cfg.num_layers):
        for rank in range(2):
            core = _core(cfg, layer + 1, rank, 2)
            assert core.kv_groups == (2 * rank, 2 * rank + 2)
            assert core.operator.modes == cfg.head_plan.layer(layer)[2 * rank : 2 * rank + 2]
            has_local_here = "local" in core.operator.modes
            has_local_anywhere = "local" in cfg.head_plan.layer(layer)
            assert core.placeholder_tail == (has_local_anywhere and not has_local_here)


def test_tp_size_must_divide_kv_heads(make_cfg):
    with pytest.raises(ConfigError, match="num_kv_heads=4"):
        _core(make_cfg(), 1, 0, 8)
    with pytest.raises(ConfigError, match="num_kv_heads=4"):
        _core(make_cfg(), 1, 0, 3)


def test_placeholder_tail_is_empty_and_leaves_outputs_unchanged(make_cfg):
    """A rank with no `local` group in a layer still hands on a (zero-size) tail with a gradient path."""
    cfg = make_cfg()
    layer = next(i for i in range(cfg.num_layers) if _core(cfg, i + 1, 1, 2).placeholder_tail)
    core = _core(cfg, layer + 1, 1, 2)
    S, B, hpg, D = cfg.segment.segment_length, 2, cfg.heads_per_group, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2 * S, B, 2 * hpg, D, generator=g, requires_grad=True)
    k = torch.randn(2 * S, B, 2, D, generator=g, requires_grad=True)
    v = torch.randn(2 * S, B, 2, D, generator=g, requires_grad=True)
    from megaseg.megatron.attention import SegmentStates

    first = SegmentStates.start([layer], None)
    core(q[:S], k[:S], v[:S], packed_seq_params=first)
    (tail,) = first.next_states([layer])
    assert tail.tail_k.shape == (B, 0, 0, D) and tail.tail_k.requires_grad
    leaf = tail.detached()
    leaf.tail_k.requires_grad_(True)
    leaf.tail_v.requires_grad_(True)
    second = SegmentStates.start([layer], [leaf])
    out = core(q[S:], k[S:], v[S:], packed_seq_params=second)
    want, _ = core.operator(q[S:].transpose(0, 1), k[S:].transpose(0, 1), v[S:].transpose(0, 1), tail.detached())
    assert torch.equal(out, want.transpose(0, 1).reshape(S, B, -1))
    out.sum().backward()
    assert leaf.tail_k.grad is not None and leaf.tail_k.grad.shape == (B, 0, 0, D)
