"""HF Llama -> megaseg -> HF: exact weights, HF-equal logits for T <= S, sharded TP/PP round trip."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megaseg.config import HeadPlan, SegmentConfig
from megaseg.checkpoint.weights import load_model_dir as load_checkpoint, read_model_dir as read_checkpoint
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint

from .tiny_hf import hf_llama

S = 32


def _plan(model, long_range=(1,)):
    c = model.config
    return HeadPlan.interleaved(c.num_hidden_layers, c.num_key_value_heads, list(long_range), 1)


def _as_transformers_4_config(path):
    """Rewrite config.json the way Llama-2/3 checkpoints ship it: rope_theta + rope_scaling."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("style", ["llama2", "llama3", "linear"])
@pytest.mark.parametrize("config_layout", ["transformers5", "transformers4"])
def test_imported_model_logits_equal_llama_for_causal_lm_up_to_segment_length(tmp_path, style, config_layout):
    hf = hf_llama(style, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    if config_layout == "transformers4":
        _as_transformers_4_config(tmp_path / "hf" / "config.json")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(S, 8, 8, 1), _plan(hf))
    model, _ = load_checkpoint(tmp_path / "ms")
    ids = torch.randint(0, hf.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got, _ = model(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings


def _weights(directory):
    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    if not sd:
        sd = torch.load(directory / "pytorch_model.bin", weights_only=True)
    return sd


@pytest.mark.parametrize("style, layout", [("llama2", "safetensors"), ("llama3", "bin"), ("llama2", "sharded")])
def test_hf_to_megaseg_to_hf_round_trip_is_bit_exact(tmp_path, style, layout):
    hf = hf_llama(style, seed=2)
    if layout == "bin":
        torch.save({k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                   tmp_path / "pytorch_model.bin")
        hf.config.save_pretrained(tmp_path / "hf")
        (tmp_path / "pytorch_model.bin").rename(tmp_path / "hf" / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(S, 8, 8, 1), _plan(hf))
    export_hf_checkpoint(tmp_path / "ms", tmp_path / "out")
    original, exported = _weights(tmp_path / "hf"), _weights(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    cfg_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings", "rope_parameters",
                "eos_token_id", "tie_word_embeddings"):
        assert cfg_out[key] == cfg_in[key], key


def test_bfloat16_import_casts_every_weight_once(tmp_path):
    hf = hf_llama("llama3", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(S, 8, 8, 1), _plan(hf), dtype=torch.bfloat16)
    sd, _, _ = read_checkpoint(tmp_path / "ms")
    ref = hf.state_dict()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in sd.items())


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_import_at_tp2_pp2_then_export_gives_the_same_weights(tmp_path, style):
    hf = hf_llama(style, seed=4, num_layers=4)
    hf.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(S, 8, 8, 1), _plan(hf, (1, 2)),
                         tp_size=2, pp_size=2)
    shards = sorted(p.parent.name for p in (tmp_path / "ms").glob("mp_rank_*/model.safetensors"))
    assert shards == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert not (tmp_path / "ms" / "model.safetensors").exists()
    stage1 = load_file(str(tmp_path / "ms" / "mp_rank_01_001" / "model.safetensors"))
    assert "decoder.layers.1.mlp.linear_fc2.weight" in stage1 and "decoder.layers.2.mlp.linear_fc2.weight" not in stage1
    assert "embedding.word_embeddings.weight" not in stage1
    export_hf_checkpoint(tmp_path / "ms", tmp_path / "out")
    original, exported = _weights(tmp_path / "hf"), _weights(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], t) for k, t in original.items())
