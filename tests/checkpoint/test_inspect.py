"""tools/inspect_checkpoint.py: plan, layout and integrity of checkpoints, without a model."""
import io
import json
from contextlib import redirect_stdout

from megaseg.hf.convert import export_hf_checkpoint
from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, tiny_config
from tools import inspect_checkpoint


def _inspect(*argv):
    out = io.StringIO()
    with redirect_stdout(out):
        status = inspect_checkpoint.main([str(a) for a in argv])
    return status, out.getvalue()


def test_tp1_checkpoint_report(model_parallel, tmp_path):
    cfg = tiny_config(tmp_path, train_iters=2)
    pretrain(cfg, cfg.model_config(cfg.vocab_size), PatternDataset(16, 32), out=io.StringIO())
    status, report = _inspect(tmp_path / "ckpt")
    assert status == 0
    lines = report.splitlines()
    assert "iteration 2, 8 samples consumed, with optimizer state" in lines
    assert "layout: TP 1, PP 1, CP 1, DP 1" in lines
    assert "segments: S=8 M=4 R=4 K=1, retrieval group reduce sum" in lines
    # tiny_config: 2 layers x 2 KV groups, KV group 0 retrieves in layer 1 and is segment-only in layer 0.
    assert lines[lines.index("  layer  0  1") + 1:][:2] == ["      0  S  L", "      1  R  L"]
    assert "integrity: ok (every file matches megaseg_manifest.json)" in lines

    status, text = _inspect(tmp_path / "ckpt" / "iter_0000002", "--json")
    info = json.loads(text)
    assert status == 0 and info["iteration"] == 2 and info["layout"]["tensor_model_parallel_size"] == 1
    assert info["model"]["head_plan"] == [["segment", "local"], ["retrieval", "local"]]
    assert info["parameters"] == sum(
        p.numel() for p in __import__("megaseg.models.llama", fromlist=["x"]).SegmentedLlamaForCausalLM(
            cfg.model_config(cfg.vocab_size)).parameters())


def test_tp2_checkpoint_report_and_a_damaged_file(tp2_checkpoint, tmp_path):
    status, report = _inspect(tp2_checkpoint, "--no-verify")
    assert status == 0 and "layout: TP 2, PP 1, CP 1, DP 1" in report and "      1  R  L" in report
    assert "integrity: not checked" in report and "tokenizer: included" in report

    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tp2_checkpoint, copy)
    shard = sorted((copy / "iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    status, report = _inspect(copy)
    assert status == 1
    assert f"integrity: FAILED: {shard}: corrupted (sha256 does not match the manifest)" in report


def test_export_and_not_a_checkpoint(tp2_checkpoint, tmp_path, capsys):
    export_hf_checkpoint(tp2_checkpoint, tmp_path / "hf")
    status, report = _inspect(tmp_path / "hf")
    assert status == 0 and report.startswith(f"{tmp_path / 'hf'}: hf-megaseg checkpoint")
    assert "model.layers.1.self_attn.q_proj.weight [32, 32]" in report and "      1  R  L" in report
    (tmp_path / "empty").mkdir()
    status, _ = _inspect(tmp_path / "empty")
    assert status == 2 and "no checkpoint found" in capsys.readouterr().err
