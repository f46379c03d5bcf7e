"""The recall recipe (examples/recall/run.sh) at its smallest configuration runs end to end
through the real CLI: data with answer masks, full-attention pretraining, head calibration,
segmented continued pretraining from it, and the evaluation of every arm."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_smallest_recipe_runs_end_to_end(tmp_path, small_data):
    _, tokenizer_model = small_data
    """With SPLIT=4 the 2-group (c) is split into 4 KV groups with one retrieval copy, pretrained
    further (c'), and (d) and the arms run on that model."""
    env = {**os.environ, "QUICK": "1", "RUN": str(tmp_path / "run"), "TOK": tokenizer_model, "DIGITS": "2", "ARMS": "1",
           "KV_GROUPS": "2", "SPLIT": "4",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(REPO / "examples" / "recall" / "run.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    split_plan = json.loads((tmp_path / "run" / "plan_split.json").read_text())
    assert [len(layer) for layer in split_plan] == [4, 4] and sum(m == "retrieval" for l in split_plan for m in l) == 1
    assert "split into 4 KV groups" in run.stdout and (tmp_path / "run" / "aligned_split").is_dir()
    rows = json.loads((tmp_path / "run" / "recall.json").read_text())
    arms = {(r["checkpoint"], r["mode"]) for r in rows}
    assert {("aligned", "own"), ("aligned", "no_retrieval"), ("aligned", "interleaved"), ("k0", "own"),
            ("m0", "own")} <= arms
    assert not any("full" in arm for arm in arms)  # (a) and full attention: the files below
    misaligned = json.loads((tmp_path / "run" / "recall_misaligned.json").read_text())
    assert {(r["checkpoint"], r["mode"]) for r in misaligned} == {("full", "misaligned")}
    full = json.loads((tmp_path / "run" / "recall_full.json").read_text())  # at the SHORT lengths only
    assert {(r["checkpoint"], r["mode"], r["data"]) for r in full} == {("aligned", "full", "256"), ("full", "full", "256")}
    baselines = json.loads((tmp_path / "run" / "recall_baselines.json").read_text())
    assert {r["mode"] for r in baselines} == {"streaming40", "duo40"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    state = {(r["checkpoint"], r["mode"]): r["state_mib"] for r in rows + full if r["data"] == "256"}
    assert 0 < state[("aligned", "no_retrieval")] < state[("aligned", "own")] < state[("aligned", "full")]
    assert {r["full_state_mib"] for r in rows if r["data"] == "256"} == {state[("aligned", "full")]}
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan  # the calibrated head plan (b) that (c) trained with


def test_the_smallest_capacity_run_sweeps_pairs_and_retrieved_prefix_sizes(tmp_path, small_data):
    """examples/recall/capacity.sh: MQAR pretraining with full attention, segmented continued
    pretraining from it, and accuracy per (pairs, R) on the same weights."""
    _, tokenizer_model = small_data
    env = {**os.environ, "QUICK": "1", "RUN": str(tmp_path / "run"), "TOK": tokenizer_model,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(REPO / "examples" / "recall" / "capacity.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    rows = json.loads((tmp_path / "run" / "capacity.json").read_text())
    assert {(r["data"], r["mode"]) for r in rows} == {(f"p{p}", m) for p in (4, 16) for m in ("r8", "r32", "no_retrieval")}
    for r in rows:
        assert r["checkpoint"] == "segmented" and r["length"] == 512
        assert r["answers"] == 4 * min(int(r["data"][1:]), 8)  # 4 documents, min(pairs, 8) queries each
        assert r["outside_reach"] == r["answers"]  # the pairs lie at least two segments before the queries
    state = {r["mode"]: r["state_mib"] for r in rows if r["data"] == "p4"}
    assert state["no_retrieval"] < state["r8"] < state["r32"]
    full = json.loads((tmp_path / "run" / "capacity_full.json").read_text())
    assert {(r["checkpoint"], r["mode"]) for r in full} == {("full", "full")}
    report = subprocess.run([sys.executable, str(REPO / "examples" / "recall" / "report.py"), "--capacity",
                             str(tmp_path / "run" / "capacity.json"), str(tmp_path / "run" / "capacity_full.json")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert "| pairs (2P tokens) | segmented / r8 | segmented / r32 | segmented / no_retrieval | full / full |" in lines
    assert [line.split(" |")[0] for line in lines if line.startswith("| 4 (8)") or line.startswith("| 16 (32)")] == \
        ["| 4 (8)", "| 16 (32)"]


def test_state_table_keeps_each_checkpoint_apart():
    """Two checkpoints evaluated in the same modes keep their own state rows; the ratio is to
    full attention's state at that length."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("recall_report", REPO / "examples" / "recall" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rows = [{"checkpoint": c, "mode": m, "data": "512", "state_mib": v}
            for c, m, v in [("aligned", "own", 0.25), ("aligned", "full", 1.0), ("full", "own", 0.0), ("full", "full", 1.0)]]
    rows.append({"checkpoint": "aligned", "mode": "own", "data": "heldout512", "state_mib": 9.0})
    lines = report.state_table(rows).splitlines()
    assert lines[2] == "| checkpoint | mode | 512 tok |"
    assert "| aligned | own | 0.25 (0.250) |" in lines
    assert "| full | own | 0.00 (0.000) |" in lines
    assert len(lines) == 8
    # a length full attention was not run at: the ratio is to the state it would hold, counted
    lines = report.state_table([{"checkpoint": "aligned", "mode": "own", "data": "4096", "state_mib": 1.0,
                                 "full_state_mib": 8.0}]).splitlines()
    assert lines[-1] == "| aligned | own | 1.00 (0.125) |"
