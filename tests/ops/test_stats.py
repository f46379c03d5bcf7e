"""megaseg.ops.stats: segment statistics read off the operator's own tensors."""
import pytest
import torch

from megaseg.config import RETRIEVAL, HeadPlan, RopeConfig, SegmentConfig
from megaseg.ops import stats
from megaseg.ops.segmented_attention import SegmentedAttention
from megaseg.training.tbptt import tbptt_backward
from tests.helpers import random_plan, tiny_model


def test_distance_metric_reports_a_planted_target_several_segments_back():
    S, D, T, target = 4, 8, 18, 1  # 4 whole segments and a partial one; the target is token 1 (segment 0)
    op = SegmentedAttention((RETRIEVAL,), SegmentConfig(S, 0, 1, 1), RopeConfig(), D, 1)
    op.layer_index, op.group_offset = 3, 5
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(D)
    u[0] = 10.0
    k = 0.01 * torch.randn(1, T, 1, D, generator=g)
    k[0, target, 0] = u
    q = 0.01 * torch.randn(1, T, 1, D, generator=g)
    q[0, S - 1 :: S, 0] = u  # every segment-end query looks for the target
    v = torch.randn(1, T, 1, D, generator=g)
    with stats.recording() as rec:
        op(q, k, v)
    scalars, hists = rec.summary()
    # Segments 1..4 retrieve the target from segment 0: distances 1, 2, 3, 4.
    assert sorted(hists["segments/retrieval_distance_histogram/layer3_group5"].tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert scalars["segments/retrieval_distance/layer3_group5"] == pytest.approx(2.5)
    assert scalars["segments/retrieval_previous_segment_share/layer3_group5"] == pytest.approx(0.25)
    assert scalars["segments/retrieval_margin/layer3_group5"] > 50  # 100 for the target, ~0 for the rest


def test_attention_mass_shares_sum_to_one_for_every_layer_and_mode():
    model = tiny_model(seed=3, num_layers=3, num_heads=4, num_kv_heads=2, S=8, M=3, R=5,
                       plan=random_plan(3, 2, seed=3)).eval()
    ids = torch.randint(0, 96, (2, 29))
    with torch.no_grad(), stats.recording() as rec:
        model(ids)
    scalars, _ = rec.summary()
    masses = {k.split("/", 2)[2]: v for k, v in scalars.items() if k.startswith("segments/prefix_mass/")}
    assert masses, "no attention-mass statistics recorded"
    for name, prefix in masses.items():
        segment = scalars[f"segments/segment_mass/{name}"]
        assert prefix + segment == pytest.approx(1.0, abs=1e-5), name
        if name.startswith("segment/"):
            assert prefix == 0.0  # segment-only heads have no prefix
        else:
            assert 0.0 < prefix < 1.0, name


def test_recording_changes_nothing_and_costs_nothing_when_off():
    model = tiny_model(seed=1).eval()
    ids = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        plain = model(ids)[0]
        with stats.recording():
            recorded = model(ids)[0]
    assert torch.equal(plain, recorded)
    assert stats.active() is None


@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_cotangent_norm_is_zero_without_truncation_depth_and_positive_with(k):
    model = tiny_model(seed=2, k=k, plan=HeadPlan.all_local(3, 2), R=0)
    ids = torch.randint(0, 96, (2, 32))

    def forward_segment(x, states):
        return model(x, states)

    with stats.recording() as rec:
        tbptt_backward(forward_segment, ids, 8, k)
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    scalars, _ = rec.summary(grad_norm)
    depths = sorted(int(n.rsplit("depth", 1)[1]) for n in scalars if n.startswith("segments/tail_cotangent_norm/"))
    assert depths == list(range(1, max(k, 1) + 1))
    if k == 0:
        assert scalars["segments/tail_cotangent_norm/depth1"] == 0.0
    else:
        for d in depths:
            assert scalars[f"segments/tail_cotangent_rel_grad/depth{d}"] > 0.0
