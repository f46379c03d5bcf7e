"""Pretraining writes the segment statistics to TensorBoard, and the custom-scalars layout."""
import io

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, tiny_config


def test_segment_statistics_reach_tensorboard(model_parallel, tmp_path):
    cfg = tiny_config(tmp_path, train_iters=4, log_segment_stats_interval=2)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), PatternDataset(32, 32), out=io.StringIO())
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    # tiny_config: KV group 0 retrieves in layer 1, is segment-only in layer 0; group 1 is local.
    for name in ("segments/retrieval_distance/layer1_group0", "segments/retrieval_previous_segment_share/layer1_group0",
                 "segments/retrieval_margin/layer1_group0", "segments/prefix_mass/local/layer0",
                 "segments/prefix_mass/retrieval/layer1", "segments/segment_mass/segment/layer0",
                 "segments/tail_cotangent_rel_grad/depth1"):
        assert name in scalars, name
    # Recorded at the first step and every 2 steps: iterations 1, 2, 4.
    assert [e.step for e in acc.Scalars("segments/tail_cotangent_rel_grad/depth1")] == [1, 2, 4]
    assert "segments/retrieval_distance_histogram/layer1_group0" in tags["histograms"]
    distance = acc.Scalars("segments/retrieval_distance/layer1_group0")[0].value
    assert 1.0 <= distance <= 4.0  # boundaries 1..4 of 4 segments: 1 to 4 segments back
    layout = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]  # a serialized Layout
    assert b"loss/segment_" in layout and b"segments/prefix_mass/" in layout
