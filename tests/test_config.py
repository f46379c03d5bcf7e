"""Configuration is validated at construction with messages naming field, value and range."""
import pytest

from megaseg.config import (
    LOCAL, RETRIEVAL, SEGMENT, ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(segment_length=0), "segment_length=0 is invalid: must be > 0"),
        (dict(segment_length=-4), "segment_length=-4 is invalid: must be > 0"),
        (dict(segment_length=8, tail_length=9), "tail_length=9 is invalid: must be <= segment_length (8)"),
        (dict(tail_length=-1), "tail_length=-1 is invalid: must be >= 0"),
        (dict(retrieval_length=-2), "retrieval_length=-2 is invalid: must be >= 0"),
        (dict(tbptt_k=-2), "tbptt_k=-2 is invalid: must be >= 0 (0 detaches every tail), or -1"),
        (dict(segment_length=8.0), "segment_length=8.0 is invalid: must be an integer"),
        (dict(retrieval_group_reduce="mean"), "retrieval_group_reduce='mean' is invalid: allowed: ('sum', 'max')"),
    ],
)
def test_segment_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as e:
        SegmentConfig(**kwargs)
    assert message in str(e.value)


def test_retrieval_length_without_retrieval_heads_is_rejected():
    with pytest.raises(ConfigError, match=r"retrieval_length=64 is invalid: is > 0 but the head plan has no `retrieval` heads"):
        ModelConfig(num_layers=2, segment=SegmentConfig(128, 16, 64))


def test_retrieval_heads_without_retrieval_length_are_rejected():
    plan = HeadPlan.contiguous(2, 4, [1], 1)
    with pytest.raises(ConfigError, match=r"retrieval_length=0 is invalid: must be > 0 when the head plan has `retrieval` heads"):
        ModelConfig(num_layers=2, segment=SegmentConfig(128, 16, 0), head_plan=plan)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: HeadPlan.prior(4, 4, [4], [0]), "long_range_layers=[4] is invalid: every layer index must be an integer in [0, 3]; got 4"),
        (lambda: HeadPlan.prior(4, 4, [-1], [0]), "long_range_layers=[-1] is invalid: every layer index must be an integer in [0, 3]"),
        (lambda: HeadPlan.prior(4, 4, [1], [4]), "long_range_heads=[4] is invalid: every KV group index must be an integer in [0, 3]; got 4"),
        (lambda: HeadPlan.prior(4, 4, [1], {7: [0]}), "long_range_heads (layer key)=[7] is invalid"),
        (lambda: HeadPlan.prior(4, 4, [1, 1], [0]), "long_range_layers=[1, 1] is invalid: layer indices must be distinct"),
        (lambda: HeadPlan.contiguous(4, 4, [1], 5), "num_long_range_heads=5 is invalid: must be an integer in [0, 4]"),
        (lambda: HeadPlan(((LOCAL, "global"),)), "head_plan.modes[0][1]='global' is invalid: allowed modes are"),
        (lambda: HeadPlan(((LOCAL, LOCAL), (LOCAL,))), "head_plan.modes[1]=('local',) is invalid: every layer needs 2 KV groups"),
        (lambda: HeadPlan.preset("paper-llama2-7b", 4, 4), "head_plan_preset='paper-llama2-7b' is invalid: is for 32 layers x 32 KV heads"),
        (lambda: HeadPlan.preset("calibrated", 4, 4), "head_plan_preset='calibrated' is invalid: allowed: local, prior"),
        (lambda: HeadPlan.preset("prior", 4, 4, [1]), "long_range_heads=None is invalid: the `prior` preset needs an explicit list"),
    ],
)
def test_head_plan_rejects(build, message):
    with pytest.raises(ConfigError) as e:
        build()
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 is invalid: must divide num_heads (4)"),
        (dict(hidden_size=30, num_heads=4), "hidden_size=30 is invalid: must be divisible by num_heads (4)"),
        (dict(head_dim=7), "head_dim=7 is invalid: must be a positive even integer"),
        (dict(vocab_size=0), "vocab_size=0 is invalid: must be an integer > 0"),
        (dict(head_plan=HeadPlan.all_local(3, 4)), "head_plan='3 layers' is invalid: must have num_layers=4 layers"),
        (dict(head_plan=HeadPlan.all_local(4, 2)), "head_plan='2 KV groups' is invalid: must have num_kv_heads=4 groups per layer"),
        (dict(rope=None), "rope=None is invalid: must be a RopeConfig"),
        (dict(head_plan=[["local"]]), "head_plan=[['local']] is invalid: must be a HeadPlan or None"),
    ],
)
def test_model_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(theta=0), "rope.theta=0 is invalid: must be > 0"),
        (dict(scaling_type="yarn"), "rope.scaling_type='yarn' is invalid: allowed: None, 'linear', 'llama3'"),
        (dict(scaling_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0), "rope.high_freq_factor=1.0 is invalid"),
    ],
)
def test_rope_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as e:
        RopeConfig(**kwargs)
    assert message in str(e.value)


def test_default_plan_long_heads_retrieve_in_long_range_layers_and_are_segment_elsewhere():
    plan = HeadPlan.prior(4, 4, [1, 3], [0, 2])
    assert plan.layer(0) == (SEGMENT, LOCAL, SEGMENT, LOCAL)
    assert plan.layer(1) == (RETRIEVAL, LOCAL, RETRIEVAL, LOCAL)
    assert plan.layer(3) == (RETRIEVAL, LOCAL, RETRIEVAL, LOCAL)
    per_layer = HeadPlan.prior(3, 2, [1], {1: [1], 2: [0]})
    assert per_layer.modes == ((LOCAL, LOCAL), (LOCAL, RETRIEVAL), (SEGMENT, LOCAL))


def test_presets():
    assert HeadPlan.contiguous(2, 8, [0], 3).layer(0) == (RETRIEVAL,) * 3 + (LOCAL,) * 5
    inter = HeadPlan.interleaved(2, 8, [0], 4)
    assert [g for g, m in enumerate(inter.layer(0)) if m == RETRIEVAL] == [0, 2, 4, 6]
    paper = HeadPlan.paper_llama2_7b()
    assert paper.num_layers == 32 and paper.num_kv_groups == 32
    assert [i for i in range(32) if RETRIEVAL in paper.layer(i)] == [6, 8, 11, 18]
    assert paper.count(RETRIEVAL) == 4 * 8 and paper.count(SEGMENT) == 28 * 8
    assert HeadPlan.preset("local", 2, 2).count(LOCAL) == 4
    assert paper.slice_groups(8, 16).num_kv_groups == 8


def test_model_config_round_trips_through_dict():
    cfg = ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, segment=SegmentConfig(64, 8, 16, 2),
                      head_plan=HeadPlan.contiguous(2, 2, [1], 1), rope=RopeConfig(scaling_type="linear", factor=2.0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_layer": 3})


def test_defaults_are_valid():
    assert ModelConfig().head_plan.count(LOCAL) == ModelConfig().num_layers * ModelConfig().num_kv_heads


def test_max_rope_position():
    assert SegmentConfig(4096, 512, 512).max_rope_position == 4096 + 512 - 1
