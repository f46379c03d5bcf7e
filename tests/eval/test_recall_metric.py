"""The retrieval hit rate reads the operator's own picks: 1.0 when the needle is the
top-scoring key of every retrieval head, 0.0 when it cannot be picked; and recall datasets
load with every answer tied to the needle it copies."""
import pytest
import torch

from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.eval.modes import InferenceMode
from megaseg.eval.recall import Answer, RecallDocument, load_recall_documents, recall_accuracy
from megaseg.models.llama import SegmentedLlamaForCausalLM

V, S, M, R = 40, 8, 2, 2
NEEDLE = (30, 31)  # two planted tokens, far before the question


def _planted_model(needle_sign: float):
    """One layer: group 0 `local`, group 1 `retrieval`. Every token's embedding has +3 on
    hidden dim 0, the needle tokens are pure ``needle_sign`` x dim 0; queries and keys read dim
    0 only, so the score of a pool token is (its dim 0) x (the segment-end query's dim 0)."""
    cfg = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      segment=SegmentConfig(S, M, R, 1), head_plan=HeadPlan((("local", "retrieval"),)))
    model = SegmentedLlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.randn(V, 16, generator=g)
        emb[:, 0] = 3.0
        for t in NEEDLE:
            emb[t] = 0
            emb[t, 0] = 4.0 * needle_sign
        model.model.embed_tokens.weight.copy_(emb)
        attn = model.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            for head in range(2):
                proj.weight[head * 8, 0] = 1.0
    return model


def _document():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (40,), generator=g).tolist()  # 5 segments of 8
    ids[3:5] = NEEDLE  # in segment 0
    ids[33:35] = NEEDLE  # the answer, produced in segment 4 (positions 32, 33): 3 segments later
    return RecallDocument(ids, "planted", 3, [Answer(33, 35, [3, 4])], needles=[(3, 5)])


@pytest.mark.parametrize("sign, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_hit_rate_is_read_from_the_operators_picks(sign, expected):
    model = _planted_model(sign)
    result = recall_accuracy(model, InferenceMode("megaseg"), [_document()])
    assert result.answers == 1 and result.outside_reach == 1
    assert result.hit_rate == expected
    assert result.hit_rate_per_head == {"layer0_group1": expected}
    assert result.needle_share == expected  # R = 2 picks: both the needle's, or neither
    assert sum(result.table.values()) == 1
    assert result.table[("correct" if result.accuracy else "wrong") + ("_retrieved" if expected else "_not_retrieved")] == 1


@pytest.mark.parametrize("sign, span, expected", [(1.0, (2, 5), 1.0), (1.0, (5, 8), 0.0), (-1.0, (2, 5), 0.0)])
def test_span_hit_rate_counts_a_picked_token_from_the_value_on(sign, span, expected):
    """The value (position 2) is never picked; the span counts when a token after it is."""
    model = _planted_model(sign)
    doc = _document()
    doc.answers = [Answer(33, 34, [2], span)]
    result = recall_accuracy(model, InferenceMode("megaseg"), [doc])
    assert result.hit_rate == 0.0 and result.span_hit_rate == expected
    assert sum(result.span_table.values()) == 1


def test_needle_share_counts_the_picks_inside_any_target_needle():
    """Of the R = 2 picks (positions 3 and 4), one lies in a needle [4, 6): share 0.5; with no
    needle recorded the share is undefined."""
    model = _planted_model(1.0)
    doc = _document()
    doc.needles = [(4, 6), (20, 22)]
    assert recall_accuracy(model, InferenceMode("megaseg"), [doc]).needle_share == 0.5
    doc.needles = []
    share = recall_accuracy(model, InferenceMode("megaseg"), [doc]).needle_share
    assert share != share


def test_an_answer_within_the_tail_needs_no_retrieval():
    model = _planted_model(1.0)
    doc = _document()
    doc.answers = [Answer(13, 15, [3, 4])]  # produced in segment 1: the needle is in the previous segment
    doc.answers[0].needle = [7]  # within the carried tail (the last M = 2 tokens of segment 0)
    result = recall_accuracy(model, InferenceMode("megaseg"), [doc])
    assert result.answers == 1 and result.outside_reach == 0


def test_recall_documents_tie_every_answer_to_its_needle(small_data, tmp_path):
    from tools import make_recall_data

    _, tokenizer = small_data
    prefix = tmp_path / "recall"
    assert make_recall_data.main(["--tokenizer-model", tokenizer, "--output-prefix", str(prefix), "--tasks",
                                  "passkey,mqar,niah_single", "--documents", "12", "--length", "256",
                                  "--segment-length", "64", "--min-gap-segments", "1", "--max-gap-segments", "2",
                                  "--haystack-fraction", "0", "--seed", "3"]) == 0
    docs = load_recall_documents(prefix)
    assert len(docs) == 12 and {d.task for d in docs} == {"passkey", "mqar", "niah_single"}
    for doc in docs:
        assert doc.answers
        for ans in doc.answers:
            # the answer copies the needle's value tokens
            assert [doc.ids[p] for p in ans.needle] == doc.ids[ans.start : ans.end][: len(ans.needle)]
            assert max(ans.needle) < ans.start
            assert any(a <= min(ans.needle) and max(ans.needle) < b for a, b in doc.needles)
            if doc.task != "mqar":  # the span starts at the value's first occurrence, inside its needle
                assert ans.span[0] <= min(ans.needle) and ans.span[1] > ans.span[0]
                assert doc.ids[ans.span[0]] == doc.ids[ans.needle[0]]


def test_recall_eval_tool_runs_every_mode_and_writes_json(small_data, tmp_path):
    import json

    from megaseg.checkpoint.weights import save_model_dir
    from megaseg.config import HeadPlan
    from tools import make_recall_data, recall_eval

    _, tokenizer = small_data
    cfg = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      segment=SegmentConfig(64, 16, 16, 1), head_plan=HeadPlan.interleaved(2, 2, [1], 1))
    save_model_dir(tmp_path / "model", SegmentedLlamaForCausalLM(cfg).state_dict(), cfg)
    prefix = tmp_path / "recall"
    assert make_recall_data.main(["--tokenizer-model", tokenizer, "--output-prefix", str(prefix), "--tasks", "mqar",
                                  "--documents", "4", "--length", "256", "--segment-length", "64",
                                  "--min-gap-segments", "2", "--max-gap-segments", "2", "--mqar-pairs", "4",
                                  "--mqar-queries", "4", "--seed", "1"]) == 0
    out = tmp_path / "rows.json"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([["local", "local"], ["retrieval", "local"]]))
    modes = ["own", "no_retrieval", "full", "streaming=4:32", "small=32:8:8:1:1", "duo=4:32", f"planned=32:8:8:@{plan}",
             "contiguous=64:16:16:0,1:2:contiguous", "prior=64:16:16:1:1:prior"]
    argv = ["--checkpoint", f"m={tmp_path / 'model'}", "--data", f"1x={prefix}", "--json", str(out)]
    assert recall_eval.main(argv + [x for m in modes for x in ("--mode", m)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["own", "no_retrieval", "full", "streaming32", "small", "duo32", "planned",
                                         "contiguous", "prior"]
    assert set(rows[6]["hit_rate_per_head"]) == {"layer1_group0"}  # the plan file's retrieval group
    assert set(rows[7]["hit_rate_per_head"]) == {"layer0_group0", "layer0_group1", "layer1_group0", "layer1_group1"}
    assert set(rows[8]["hit_rate_per_head"]) == {"layer1_group1"}
    # attention state of a 256-token document, 2 layers x 2 KV groups of head dim 8, fp32 K and V:
    # full attention holds every token of every group. The own (interleaved) plan: layer 1's
    # group 0 a pool of every token and the retrieved 16-token prefix, the two `local` groups
    # a 16-token tail each, layer 0's group 0 (`segment`) nothing; no retrieval makes that
    # retrieval group local too
    state = {r["mode"]: r["state_mib"] * 2**20 for r in rows}
    token = 2 * 8 * 4  # K and V of one token in one group
    assert state["full"] == 4 * 256 * token
    # every row counts what full attention would hold: the full row's measured state
    assert {r["full_state_mib"] for r in rows} == {state["full"] / 2**20}
    assert state["own"] == (256 + 16 + 2 * 16) * token
    assert state["no_retrieval"] == 3 * 16 * token
    assert state["streaming32"] < state["own"] < state["full"]
    own = rows[0]
    assert own["answers"] == 16 and own["outside_reach"] == 16  # gap 2 > the 16-token tail
    assert set(own["hit_rate_per_head"]) == {"layer1_group0"} and 0.0 <= own["hit_rate"] <= 1.0
    no_picks = rows[1]["needle_share"]  # no retrieval head: no picks, NaN in the JSON
    assert 0.0 <= own["needle_share"] <= 1.0 and no_picks != no_picks
    assert rows[1]["hit_rate_per_head"] == {} and rows[1]["outside_reach"] == 16 and rows[1]["hit_rate"] == 0.0
    assert rows[2]["outside_reach"] == 0 and rows[4]["length"] == 256
    with pytest.raises(SystemExit) as info:
        recall_eval.main(argv[:2])
    assert info.value.code == 2
    assert recall_eval.main(argv + ["--mode", "bad=1:2"]) == 2
    # calibration on the same documents, scored on their answers
    from tools import select_heads

    calibrated = tmp_path / "calibrated.json"
    assert select_heads.main([str(tmp_path / "model"), "--tokenizer", tokenizer, "--output", str(calibrated),
                              "--budget", "1", "--recall-data", str(prefix), "--recall-documents", "3"]) == 0
    record = json.loads(calibrated.with_suffix(".scores.json").read_text())
    assert record["recall_data"] == str(prefix) and record["sequences"] == 3 and record["length"] == 256
    assert sum(m == "retrieval" for row in json.loads(calibrated.read_text()) for m in row) == 1
    plan.write_text(json.dumps([["local", "retrieval"]]))  # one layer for a 2-layer model
    assert recall_eval.main(argv + ["--mode", f"bad=32:8:8:@{plan}"]) == 2


@pytest.mark.parametrize("needle, span, at", [([3], (3, 5), "0-25%"), ([4], (4, 5), "50-75%")])
def test_depth_and_prefix_position_bins(needle, span, at):
    """The R = 2 picks are positions 3 and 4 in that order: a needle starting at 3 sits at
    index 0 of the prefix, one at 4 at index 1 (half of R); both lie in the document's first
    quarter (4 / 40). With the needle not pickable, only the depth bin counts."""
    doc = _document()
    doc.answers = [Answer(33, 34, needle, span)]
    result = recall_accuracy(_planted_model(1.0), InferenceMode("megaseg"), [doc])
    ok = int(result.accuracy)
    assert result.depth_accuracy == {"0-25%": [ok, 1], "25-50%": [0, 0], "50-75%": [0, 0], "75-100%": [0, 0]}
    assert result.prefix_position_accuracy == {q: ([ok, 1] if q == at else [0, 0]) for q in result.depth_accuracy}
    missed = recall_accuracy(_planted_model(-1.0), InferenceMode("megaseg"), [doc])
    assert missed.depth_accuracy["0-25%"] == [int(missed.accuracy), 1]
    assert all(n == 0 for _, n in missed.prefix_position_accuracy.values())
