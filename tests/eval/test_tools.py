"""tools/evaluate.py and tools/select_heads.py: a small run end to end, and one line with
exit code 2 for each kind of bad input."""
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from megaseg.config import HeadPlan
from megaseg.eval.loading import ByteTokenizer
from megaseg.checkpoint.weights import save_model_dir
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(seed=0, vocab=ByteTokenizer.vocab_size, num_kv_heads=2, S=64, M=8, R=16,
                       plan=HeadPlan((("local", "segment"), ("retrieval", "local"), ("local", "local"))))
    save_model_dir(d / "with_tok", model.state_dict(), model.config)
    ByteTokenizer().save(d / "with_tok")
    save_model_dir(d / "no_tok", model.state_dict(), model.config)
    corpus = d / "corpus"
    corpus.mkdir()
    for name in ("a.py", "b.py"):  # enough real text for a few hundred tokens
        (corpus / name).write_text((Path(yaml.__file__).parent / "__init__.py").read_text())
    (d / "empty").mkdir()
    return d


def _write(tmp_path, cfg):
    p = tmp_path / "eval.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _base(ckpt, tmp_path, **over):
    cfg = {"checkpoints": {"tiny": str(ckpt / "with_tok")}, "corpus": str(ckpt / "corpus"), "lengths": [200, 400],
           "tasks": ["passkey", "niah_single"], "samples": 2, "perplexity": {"documents": 1, "bucket": 64},
           "modes": [{"name": "megaseg", "kind": "megaseg"}, {"name": "full", "kind": "full", "chunk": 64},
                     {"name": "streaming", "kind": "streaming", "sinks": 2, "window": 64, "chunk": 64},
                     {"name": "duo", "kind": "duo", "sinks": 2, "window": 64, "chunk": 64,
                      "full_heads": [["local", "local"], ["retrieval", "local"], ["local", "local"]]}],
           "output": str(tmp_path / "out"), "threads": 1}
    cfg.update(over)
    return cfg


def test_evaluate_runs_modes_tasks_lengths(ckpt, tmp_path, capsys):
    rc = _tool("evaluate").main([_write(tmp_path, _base(ckpt, tmp_path))])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(r["mode"], r["length"]): r for r in res["rows"]}
    assert set(rows) == {(m, L) for m in ("megaseg", "full", "streaming", "duo") for L in (200, 400)}
    for r in rows.values():
        assert set(r["tasks"]) == {"passkey", "niah_single"} and 0 <= r["accuracy"] <= 1 and r["ppl"] > 1
    # Full attention keeps every token; streaming a fixed cache; duo in between.
    full, stream, duo = (rows[(m, 400)]["task_peak_state_mib"] for m in ("full", "streaming", "duo"))
    assert stream < duo < full
    out = capsys.readouterr()
    assert ("results.png" in out.out) or ("matplotlib is not installed" in out.err)


@pytest.mark.parametrize("change, message", [
    ({"tasks": ["passkey", "nope"]}, "task='nope' is invalid"),
    ({"lengths": [20]}, "needs at least"),
    ({"corpus": "EMPTY"}, "is empty"),
    ({"lengths": [100000]}, "too small"),
    ({"checkpoints": {"t": "NO_TOK"}}, "has no tokenizer"),
    ({"modes": [{"name": "f", "kind": "full", "max_length": 128}]}, "runs at most 128 tokens"),
    ({"modes": [{"name": "f", "kind": "duo"}]}, "needs full_heads"),
])
def test_evaluate_bad_input_one_line_exit_2(ckpt, tmp_path, capsys, change, message):
    cfg = _base(ckpt, tmp_path, **change)
    if cfg["corpus"] == "EMPTY":
        cfg["corpus"] = str(ckpt / "empty")
    if cfg["checkpoints"] == {"t": "NO_TOK"}:
        cfg["checkpoints"] = {"t": str(ckpt / "no_tok")}
    rc = _tool("evaluate").main([_write(tmp_path, cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and err.startswith("error: ")


@pytest.mark.parametrize("experiment", [{"steps": 10, "variants": ["full", "tbptt1"]}, None])
def test_evaluate_experiment_key_points_to_pretraining_one_line_exit_2(ckpt, tmp_path, capsys, experiment):
    """The in-process training experiment is gone: a file that still asks for it, with or
    without checkpoints beside it, stops before any work and says where training runs."""
    for cfg in ({"output": str(tmp_path / "out"), "experiment": experiment},
                _base(ckpt, tmp_path, experiment=experiment)):
        rc = _tool("evaluate").main([_write(tmp_path, cfg)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and err.startswith("error: "), err
        assert "pretrain/pretrain_gpt.py" in err and "examples/recall/run.sh" in err and "experiment" in err
        assert not (tmp_path / "out").exists()


def test_select_heads_writes_a_plan_the_converter_reads(ckpt, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = _tool("select_heads").main([str(ckpt / "with_tok"), "--budget", "2", "--output", str(out), "--corpus",
                                     str(ckpt / "corpus"), "--length", "160", "--documents", "1", "--tasks", "passkey",
                                     "--samples-per-task", "1", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    from megaseg.segment_options import read_plan_file as read_plan

    plan = read_plan(out)
    assert plan.count("retrieval") == 2 and plan.num_layers == 3
    side = json.loads(out.with_suffix(".scores.json").read_text())
    assert [tuple(p) for p in side["ranking"][:2]] == sorted(
        [(i, g) for i, row in enumerate(plan.modes) for g, m in enumerate(row) if m == "retrieval"],
        key=lambda p: -side["scores"][p[0]][p[1]])
    rc = _tool("select_heads").main([str(ckpt / "no_tok"), "--budget", "1", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has no tokenizer" in err and "\n" not in err
