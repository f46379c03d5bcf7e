"""Flags, YAML and their validation: a bad value is one line naming the field."""
from pathlib import Path

import pytest

from megaseg.config import ConfigError
from megaseg.training.arguments import PretrainConfig, build_parser, parse_args

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_default_run():
    cfg = parse_args([])
    assert cfg == PretrainConfig()
    model = cfg.model_config(vocab_size=4096)
    assert (model.num_layers, model.hidden_size, model.segment.segment_length) == (4, 256, 512)
    assert model.head_plan.has_retrieval()


def test_megatron_flag_names_map_to_fields():
    cfg = parse_args([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "1e-3",
        "--train-iters", "7", "--save", "out", "--load", "in", "--segment-length", "16", "--tail-length", "4",
        "--retrieval-length", "8", "--tbptt-k", "2", "--long-range-layers", "0", "1", "--num-long-range-heads", "1",
        "--no-untie-embeddings-and-output-weights",
    ])
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.seq_length) == (2, 64, 2, 64)
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.lr, cfg.train_iters) == (1, 8, 1e-3, 7)
    assert (cfg.save, cfg.load, cfg.tbptt_k, cfg.long_range_layers) == ("out", "in", 2, [0, 1])
    model = cfg.model_config(100)
    assert model.tie_word_embeddings and model.num_kv_heads == 2
    assert model.head_plan.modes[0] == ("retrieval", "local") and model.segment.retrieval_length == 8


def test_yaml_sets_fields_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 2\nhidden_size: 64\nlr: 3e-4\nlong_range_layers: [1]\ntrain_iters: 9\n")
    cfg = parse_args(["--config", str(path), "--train-iters", "5"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.lr, cfg.long_range_layers) == (2, 64, 3e-4, [1])
    assert cfg.train_iters == 5
    assert parse_args(["--yaml-cfg", str(path)]).train_iters == 9


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hiden_size: 64\n", "unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
        ("hidden_size: big\n", "hidden_size='big' is invalid: must be an integer"),
        ("tail_length: 600\n", "tail_length=600 is invalid: must be <= segment_length (512)"),
        ("lr: -1\n", "lr=-1.0 is invalid"),
        ("num_query_groups: 3\n", "num_query_groups=3 is invalid"),
        ("long_range_layers: [1, 9]\n", "long_range_layers=[1, 9] is invalid"),
        ("global_batch_size: 3\n", "global_batch_size=3 is invalid: must be a multiple of micro_batch_size (2)"),
        ("lr_decay_style: wavy\n", "lr_decay_style='wavy' is invalid: allowed: constant, linear, cosine"),
        ("num_layers: [\n", "invalid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_one_line_naming_file_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path)])
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--tail-length", "600"], "tail_length=600"),
        (["--num-attention-heads", "3"], "hidden_size=256 is invalid: must be divisible"),
        (["--kv-channels", "3"], "kv_channels=3"),
        (["--head-plan-preset", "local"], "retrieval_length=64 is invalid"),
        (["--lr-warmup-iters", "100"], "lr_warmup_iters=100 is invalid: must be < lr_decay_iters (100)"),
        (["--lr-warmup-fraction", "1.5"], "lr_warmup_fraction=1.5 is invalid"),
        (["--min-lr", "1"], "min_lr=1.0 is invalid: must be <= lr"),
        (["--pipeline-model-parallel-size", "3"], "pipeline_model_parallel_size=3 is invalid: must divide num_layers"),
        (["--num-layers-per-virtual-pipeline-stage", "2"], "num_layers_per_virtual_pipeline_stage='2' is invalid"),
        (["--split", "1,0"], "split='1,0' is invalid"),
    ],
)
def test_bad_flag_values_name_the_field(argv, expected):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_flag_errors_name_the_flag_not_a_yaml_file(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train_iters: 10\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path), "--lr-warmup-iters", "10"])
    assert str(info.value).startswith("lr_warmup_iters=10")


def test_unknown_flag_and_missing_file_exit_with_status_2_or_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        parse_args(["--hiden-size", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--hiden-size" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_every_field_has_a_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert set(PretrainConfig().to_dict()) <= dests


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "examples").glob("*.yaml")))
def test_example_configs_are_valid(path):
    cfg = parse_args(["--config", path])
    cfg.model_config(vocab_size=32000)


def test_default_yaml_is_the_no_argument_run():
    from_yaml = parse_args(["--config", str(REPO / "examples" / "default.yaml")]).to_dict()
    assert from_yaml.pop("config").endswith("default.yaml")
    defaults = PretrainConfig().to_dict()
    defaults.pop("config")
    assert from_yaml == defaults
