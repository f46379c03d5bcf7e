"""Calibrated head selection ranks a planted long-range head first."""
import json

import pytest
import torch

from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.eval.head_selection import plan_record, ranking, score_heads, select_plan, write_plan
from megaseg.segment_options import read_plan_file as read_plan
from megaseg.models.llama import SegmentedLlamaForCausalLM

PLANTED = (0, 2)  # (layer, KV group)
S = 16
VOCAB = HIDDEN = 64


def planted_model():
    """Two layers, four KV groups, RoPE switched off in effect (linear scaling 1e6), random
    heads except group 2 of layer 0: a token b attends to earlier tokens a with a + 1 = b
    (mod vocab), wherever they are. Its query map sends the normalised embedding of b to
    P e_b, its key map sends that of a to P e_(a+1)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, rope=RopeConfig(scaling_type="linear", factor=1e6),
                      segment=SegmentConfig(S, 4, 0, 1))
    model = SegmentedLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 1.0)
        for p in model.parameters():
            if p.dim() == 2 and p is not emb:
                p.normal_(0, 0.1)
        layer, g = PLANTED
        attn = model.model.layers[layer].self_attn
        E = emb.T / emb.pow(2).mean(1).sqrt()  # columns: normalised embeddings (layer 0's input)
        shift = torch.linalg.solve(E.T, E.roll(-1, dims=1).T).T  # shift @ E[:, a] = E[:, a + 1]
        proj = torch.randn(16, HIDDEN) * 0.3
        attn.q_proj.weight[g * 16:(g + 1) * 16] = proj
        attn.k_proj.weight[g * 16:(g + 1) * 16] = proj @ shift
    return model


def calibration(n=3, half=40):
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (half,), generator=g)
        seqs.append(torch.cat([x, (x + 1) % VOCAB]))  # the partner of each late token is `half` (> S) back
    return seqs


def test_planted_long_range_head_ranks_first():
    # A random model predicts nothing, so its loss change is noise: score by the change of
    # its next-token distributions (KL), which needs no labels.
    model = planted_model()
    before = [layer.self_attn.core for layer in model.model.layers]
    scores = score_heads(model, calibration(), S, "kl")
    assert ranking(scores)[0] == PLANTED
    top, second = sorted(scores.flatten().tolist(), reverse=True)[:2]
    assert top > 2 * second
    # The model's own cores are back afterwards.
    assert [layer.self_attn.core for layer in model.model.layers] == before


def test_plan_from_scores_and_files(tmp_path):
    scores = torch.zeros(3, 4, dtype=torch.float64)
    scores[1, 2], scores[2, 0], scores[0, 3] = 3.0, 2.0, 1.0
    plan = select_plan(scores, 2)
    assert plan.modes == (("local",) * 4, ("local", "local", "retrieval", "local"), ("retrieval", "local", "local", "local"))
    rec = plan_record(scores, plan, 2, "loss", 16)
    path, side = write_plan(tmp_path / "plan.json", rec)
    assert read_plan(path) == plan and read_plan(side) == plan
    assert json.loads(side.read_text())["pretraining"] == {"head_plan_preset": "prior", "long_range_layers": [1, 2],
                                                           "long_range_heads": [2]}
    assert json.loads(path.read_text()) == plan.to_list()  # what --head-plan-file FILE reads
    assert select_plan(scores, 0) == HeadPlan.all_local(3, 4)
    # choosing only among the groups of given long-range layers
    assert select_plan(scores, 2, [0, 2]).modes == (("local", "local", "local", "retrieval"), ("local",) * 4,
                                                    ("retrieval", "local", "local", "local"))
    assert select_plan(scores, 1, [0]).modes[0] == ("local", "local", "local", "retrieval")
    for bad in ([3], []):
        with pytest.raises(ConfigError, match="layers="):
            select_plan(scores, 1, bad)
    with pytest.raises(ConfigError, match="budget=5"):
        select_plan(scores, 5, [1])


def test_calibration_must_reach_past_the_segment():
    with pytest.raises(ConfigError, match="longer than segment_length"):
        score_heads(planted_model(), [torch.arange(S)], S)


def test_one_reader_takes_every_plan_file_shape(tmp_path):
    """Pretraining's --head-plan-file and evaluation read the same files: a bare list, the
    scores sidecar select_heads writes ({"modes": ...}) and a plan with provenance
    ({"head_plan": ...}); anything else is one line naming the setting."""
    import json

    from megaseg.config import ConfigError, HeadPlan
    from megaseg.segment_options import read_plan_file

    plan = HeadPlan((("local", "retrieval"), ("segment", "local")))
    shapes = {"list": plan.to_list(), "sidecar": {"modes": plan.to_list(), "scores": [[0.1, 0.9]]},
              "provenance": {"head_plan": plan.to_list(), "source": "x"}}
    for name, data in shapes.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        assert read_plan_file(str(path)) == plan == read_plan(path), name
    bad = tmp_path / "bad.json"
    for data, needle in (({"layers": []}, "expected [[mode, ...] per layer]"), ([["local", "nope"]], "nope")):
        bad.write_text(json.dumps(data))
        with pytest.raises(ConfigError) as info:
            read_plan_file(str(bad))
        assert str(info.value).startswith(f"head_plan_file={str(bad)!r} is invalid") and needle in str(info.value)


def test_targets_score_only_the_listed_predictions():
    """select_heads --recall-data scores a recall document on its answers only."""
    model, seqs = planted_model(), calibration()
    every = score_heads(model, seqs, S, "kl")
    assert torch.equal(score_heads(model, seqs, S, "kl", targets=[range(S + 1, len(s)) for s in seqs]), every)
    late = score_heads(model, seqs, S, "kl", targets=[range(41, 80)] * 3)  # each partner 40 tokens back
    early = score_heads(model, seqs, S, "kl", targets=[range(S + 1, 40)] * 3)  # no partner anywhere
    assert ranking(late)[0] == PLANTED and late[PLANTED] > early[PLANTED]
    mixed = score_heads(model, seqs, S, "kl", targets=[None, range(41, 80), range(41, 80)])
    assert not torch.equal(mixed, late) and not torch.equal(mixed, every)
    with pytest.raises(ConfigError, match="past the first segment"):
        score_heads(model, seqs, S, targets=[[S]] * 3)
    with pytest.raises(ConfigError, match="3 calibration sequences"):
        score_heads(model, seqs, S, targets=[None])
