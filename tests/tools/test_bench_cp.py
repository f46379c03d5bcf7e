"""tools/bench_cp.py: the paper-setting byte table, and a tiny run whose counted bytes equal the formula."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Importable by name: the script's spawned ranks unpickle its functions from module bench_cp.
sys.path.append(str(REPO / "tools"))  # appended: tools/ names must not shadow installed packages
import bench_cp as bench  # noqa: E402


def test_paper_bytes_by_hand():
    got = bench.paper_bytes()
    # Ring forward: (P - 1) x T x 32 KV groups x (K and V) x 128 x 2 bytes.
    assert got["ring_forward_bytes_per_layer"] == 3 * 32768 * 32 * 2 * 128 * 2
    k1 = got["by_k"]["1"]
    types = {(t["local_groups"], t["retrieval_groups"], t["segment_groups"]): t for t in k1["layer_types"]}
    assert set(types) == {(24, 8, 0), (24, 0, 8)}
    assert types[(24, 8, 0)]["layers"] == [6, 8, 11, 18]
    local = types[(24, 0, 8)]["bytes_by_kind"]
    tail = 512 * 24 * 2 * 128 * 2  # M x local groups x (K, V) x D x bf16
    assert local == {"tail": 3 * tail, "tail_grad": 3 * tail, "query": 0, "candidates": 0, "prefix": 0}
    retrieval = types[(24, 8, 0)]["bytes_by_kind"]
    # 2 boundaries per rank; each (earlier, later) rank pair: 2 x 8 groups x 512 candidates.
    assert retrieval["candidates"] == 6 * 2 * 8 * 512 * (4 + 8 + 2 * 128 * 2)
    assert retrieval["prefix"] == 3 * 512 * 8 * 2 * 128 * 2
    mean = (4 * sum(retrieval.values()) + 28 * sum(local.values())) / 32
    assert k1["mean_bytes_per_layer"] == mean
    assert k1["mean_over_ring"] <= 1 / 8


def test_quick_run_writes_json_and_counted_bytes_equal_formula(tmp_path):
    out = tmp_path / "cp.json"
    assert bench.main(["--quick", "--parts", "bytes", "--bytes-cp", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"torch", "cpu_count", "threads_per_process", "wall_seconds"} <= set(result["env"])
    assert set(result["paper_bytes"]["by_k"]) == {"1", "-1"}
    measured = result["measured_bytes"]
    assert measured["all_equal"]
    layout = bench.ChunkLayout(measured["seq_length"], measured["model"]["segment_length"], measured["cp"])
    model = measured["model"]
    for k, per_k in measured["by_k"].items():
        assert len(per_k["layers"]) == 2
        for row in per_k["layers"]:
            want = bench.bytes_per_layer(
                layout, batch=1, tbptt_k=int(k), head_dim=model["head_dim"], local_groups=row["local_groups"],
                retrieval_groups=row["retrieval_groups"], heads_per_group=model["num_heads"] // model["num_kv_heads"],
                tail_length=model["tail_length"], retrieval_length=model["retrieval_length"], element_size=4)
            assert row["measured"] == want, (k, row)
        retrieval_layer = per_k["layers"][0]["measured"]
        assert retrieval_layer["candidates"] > 0 and retrieval_layer["prefix"] > 0 and retrieval_layer["tail_grad"] > 0
