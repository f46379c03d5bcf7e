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
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")  # Mistral and Qwen2 are supported
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["import", str(hf_dir), str(tmp_path / "ms")], "unsupported architecture ['GPTNeoXForCausalLM']")


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


# ---- export: the tokenizer's BOS follows the training run; overrides are recorded --------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step in-process pretraining checkpoint carrying a sentencepiece tokenizer."""
    from ..eval.test_modes_any_checkpoint import pretraining_checkpoint, train_tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    tok = train_tokenizer(root / "tok.model")
    return pretraining_checkpoint(root, tok), tok


def _training_data_ids(tmp_path, tokenizer_model, text):
    """The ids megaseg's preprocessing writes into the training data for ``text``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaseg.data.preprocess import preprocess_jsonl

    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prefix = preprocess_jsonl(tmp_path / "doc.jsonl", tokenizer_model, tmp_path / "doc", append_eod=False).prefixes["text"]
    dataset = IndexedDataset(prefix)
    return dataset[0].tolist()


def test_exported_pretraining_checkpoint_tokenizes_as_its_training_data(pretrained, tmp_path, capsys):
    from transformers import AutoTokenizer

    from megaseg.eval.loading import load_for_eval
    from megaseg.inference.tokenizer import TextTokenizer

    ckpt, tok = pretrained
    text = "the big cat sat on the red mat and then"
    data = _training_data_ids(tmp_path, tok, text)
    assert data and data[0] != 1  # no BOS in the training data
    assert convert.main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids == data
    assert TextTokenizer.load(tmp_path / "out").encode(text) == data
    assert load_for_eval(ckpt)[1].encode(text) == data  # the checkpoint itself, as evaluation and generate.py read it
    assert "overridden_from" not in json.loads((tmp_path / "out" / "config.json").read_text())["megaseg"]
    # An imported HF Llama whose tokenizer adds BOS keeps it.
    hf_llama("llama2", seed=1, num_layers=2).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tok.read_bytes())
    assert convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "ms"), "--segment-length", "16",
                         "--tail-length", "4"]) == 0
    assert convert.main(["export", str(tmp_path / "ms"), str(tmp_path / "out2")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "out2")(text).input_ids == [1] + data
    assert TextTokenizer.load(tmp_path / "out2").encode(text) == [1] + data


def test_export_with_full_attention_or_no_retrieval_records_what_it_overrode(pretrained, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from megaseg.checkpoint.formats import read_model

    ckpt, _ = pretrained
    source = read_model(ckpt, weights=False).config
    own = {"segment": {"segment_length": 8, "tail_length": 4, "retrieval_length": 4, "tbptt_k": 1,
                       "retrieval_group_reduce": "sum"},
           "head_plan": [["segment", "local"], ["retrieval", "local"]]}
    assert own["head_plan"] == source.head_plan.to_list()

    assert convert.main(["export", str(ckpt), str(tmp_path / "full"), "--full-attention"]) == 0
    assert "overridden from the checkpoint's S=8 M=4 R=4" in capsys.readouterr().out
    section = json.loads((tmp_path / "full" / "config.json").read_text())["megaseg"]
    assert section["overridden_from"] == own
    assert section["head_plan"] == [["local", "local"], ["local", "local"]]
    assert (section["segment"]["segment_length"], section["segment"]["tail_length"],
            section["segment"]["retrieval_length"]) == (4096, 0, 0)  # the export's max_position_embeddings
    # One segment: the exported model is plain causal attention, as stock transformers runs it.
    assert convert.main(["export", str(ckpt), str(tmp_path / "plain"), "--no-segmentation"]) == 0
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(1))
    seg = AutoModelForCausalLM.from_pretrained(tmp_path / "full", trust_remote_code=True).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(seg(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
        # ... which is not what the checkpoint runs with its own segments (S = 8).
        assert not torch.allclose(read_model(ckpt).build()(ids)[0], plain(ids).logits, atol=1e-3)

    assert convert.main(["export", str(ckpt), str(tmp_path / "nr"), "--no-retrieval", "--segment-length", "16"]) == 0
    section = json.loads((tmp_path / "nr" / "config.json").read_text())["megaseg"]
    assert section["overridden_from"] == own
    assert section["head_plan"] == [["segment", "local"], ["local", "local"]]
    assert (section["segment"]["segment_length"], section["segment"]["tail_length"],
            section["segment"]["retrieval_length"]) == (16, 4, 0)


def test_full_attention_is_the_base_models_context_and_refuses_what_contradicts_it(tmp_path, hf_dir, capsys):
    assert convert.main(["import", str(hf_dir), str(tmp_path / "ms"), "--segment-length", "16", "--tail-length", "4",
                         "--retrieval-length", "4", "--head-plan-preset", "interleaved", "--long-range-layers", "1",
                         "--num-long-range-heads", "1"]) == 0
    assert convert.main(["export", str(tmp_path / "ms"), str(tmp_path / "out"), "--full-attention"]) == 0
    capsys.readouterr()
    section = json.loads((tmp_path / "out" / "config.json").read_text())["megaseg"]
    assert section["segment"]["segment_length"] == 256  # the base Llama's max_position_embeddings
    ms = str(tmp_path / "ms")
    _one_line_error(capsys, ["export", ms, str(tmp_path / "x"), "--full-attention", "--tail-length", "4"],
                    "--tail-length is invalid with --full-attention")
    _one_line_error(capsys, ["export", ms, str(tmp_path / "x"), "--full-attention", "--head-plan-preset", "local"],
                    "--head-plan-preset is invalid with --full-attention")
    _one_line_error(capsys, ["export", ms, str(tmp_path / "x"), "--no-retrieval", "--retrieval-length", "4"],
                    "--retrieval-length=4 is invalid with --no-retrieval")
    _one_line_error(capsys, ["export", ms, str(tmp_path / "x"), "--retrieval-length", "0"],
                    "retrieval_length=0 is invalid")
    with pytest.raises(SystemExit) as exit_:
        convert.main(["export", ms, str(tmp_path / "x"), "--full-attention", "--no-retrieval"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "not allowed with argument" in err
    assert not (tmp_path / "x").exists()
