"""tools/convert_hf.py: import/export from the command line; bad inputs are one-line errors."""
import json

import pytest
from safetensors.torch import load_file, save_file

from megaseg.checkpoint.weights import read_model_dir as read_checkpoint

from ..hf.tiny_hf import hf_llama, load_tool

convert = load_tool("convert_hf")


@pytest.fixture()
def hf_dir(tmp_path):
    hf_llama("llama3", seed=7, num_layers=4).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _one_line_error(capsys, argv, needle):
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    return err


def test_import_with_a_preset_plan_then_export(tmp_path, hf_dir, capsys):
    assert convert.main(["import", str(hf_dir), str(tmp_path / "ms"), "--segment-length", "64", "--tail-length", "16",
                         "--retrieval-length", "32", "--head-plan-preset", "interleaved", "--long-range-layers", "1", "3",
                         "--num-long-range-heads", "1"]) == 0
    _, cfg, _ = read_checkpoint(tmp_path / "ms")
    assert (cfg.segment.segment_length, cfg.segment.tail_length, cfg.segment.retrieval_length) == (64, 16, 32)
    assert cfg.head_plan.to_list() == [["segment", "local"], ["retrieval", "local"], ["segment", "local"], ["retrieval", "local"]]
    assert convert.main(["export", str(tmp_path / "ms"), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["megaseg"]["head_plan"] == cfg.head_plan.to_list()
    assert "exported" in capsys.readouterr().out


def test_head_plan_from_a_json_file(tmp_path, hf_dir):
    modes = [["local", "retrieval"], ["segment", "local"], ["local", "local"], ["local", "segment"]]
    (tmp_path / "plan.json").write_text(json.dumps(modes))
    assert convert.main(["import", str(hf_dir), str(tmp_path / "ms"), "--segment-length", "16", "--tail-length", "4",
                         "--head-plan-file", str(tmp_path / "plan.json")]) == 0
    _, cfg, _ = read_checkpoint(tmp_path / "ms")
    assert cfg.head_plan.to_list() == modes and cfg.segment.retrieval_length == 512


def test_missing_tensor_is_a_one_line_error(tmp_path, hf_dir, capsys):
    sd = load_file(str(hf_dir / "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(hf_dir / "model.safetensors"))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "missing tensor model.layers.2.mlp.up_proj.weight")
    assert not (tmp_path / "ms").exists()


def test_config_whose_heads_do_not_match_the_weights_is_a_one_line_error(tmp_path, hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the weights were made with 2 KV heads
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "config does not match the weights")


def test_unknown_architecture_is_a_one_line_error(tmp_path, hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "unsupported architecture ['MistralForCausalLM']")


@pytest.mark.parametrize("argv_tail, needle", [
    (["--head-plan-preset", "interleaved", "--num-long-range-heads", "5"], "num_long_range_heads=5"),
    (["--head-plan-file", "nope.json"], "head_plan_file='nope.json'"),
    (["--num-long-range-heads", "1"], "--num-long-range-heads is invalid without --head-plan-preset"),
    (["--segment-length", "16", "--tail-length", "32"], "tail_length=32"),
    (["--tp", "3"], "tp_size=3"),
])
def test_bad_options_are_one_line_errors(tmp_path, hf_dir, capsys, argv_tail, needle):
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms"), *argv_tail], needle)


def test_unsupported_rope_scaling_and_missing_weights_are_one_line_errors(tmp_path, hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "rope scaling type 'yarn'")
    (hf_dir / "model.safetensors").unlink()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "no weights found")
    _one_line_error(capsys, ["export", str(tmp_path / "nowhere"), str(tmp_path / "out")], "nowhere: does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["export", str(tmp_path / "empty"), str(tmp_path / "out")], "no checkpoint found")
    _one_line_error(capsys, ["import", str(tmp_path / "empty"), str(tmp_path / "ms")], "no checkpoint found")


def test_truncated_megaseg_checkpoint_is_a_one_line_error(tmp_path, hf_dir, capsys):
    assert convert.main(["import", str(hf_dir), str(tmp_path / "ms"), "--segment-length", "16", "--tail-length", "4"]) == 0
    capsys.readouterr()
    sd = load_file(str(tmp_path / "ms" / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, str(tmp_path / "ms" / "model.safetensors"))
    _one_line_error(capsys, ["export", str(tmp_path / "ms"), str(tmp_path / "out")], "missing tensor model.norm.weight")


def test_never_writes_over_other_weights_but_replaces_its_own(tmp_path, hf_dir, capsys):
    argv = ["import", str(hf_dir), str(tmp_path / "ms"), "--segment-length", "16", "--tail-length", "4"]
    assert convert.main(argv + ["--tp", "2"]) == 0
    assert convert.main(argv) == 0  # re-import with another layout: the old shards go
    assert not list((tmp_path / "ms").glob("mp_rank_*/*.safetensors"))
    read_checkpoint(tmp_path / "ms")  # the single-file layout is complete
    assert convert.main(["export", str(tmp_path / "ms"), str(tmp_path / "out")]) == 0
    assert convert.main(["export", str(tmp_path / "ms"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["export", str(tmp_path / "ms"), str(hf_dir)], "already holds weights (model.safetensors)")
    _one_line_error(capsys, ["import", str(hf_dir), str(hf_dir), "--segment-length", "16", "--tail-length", "4"],
                    "already holds weights")
