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
    env = {**os.environ, "QUICK": "1", "RUN": str(tmp_path / "run"), "TOK": tokenizer_model, "DIGITS": "2", "ARMS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(REPO / "examples" / "recall" / "run.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    rows = json.loads((tmp_path / "run" / "recall.json").read_text())
    arms = {(r["checkpoint"], r["mode"]) for r in rows}
    assert {("aligned", "own"), ("aligned", "no_retrieval"), ("full", "full"), ("k0", "own"), ("m0", "own")} <= arms
    misaligned = json.loads((tmp_path / "run" / "recall_misaligned.json").read_text())
    assert {(r["checkpoint"], r["mode"]) for r in misaligned} == {("full", "misaligned")}
    baselines = json.loads((tmp_path / "run" / "recall_baselines.json").read_text())
    assert {r["mode"] for r in baselines} == {"streaming40", "duo40"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan  # the calibrated head plan (b) that (c) trained with
