"""Splitting KV groups (tools/split_kv_groups.py): every query head keeps its keys and values."""
import json

import pytest
import torch

from megaseg.checkpoint.formats import read_model
from megaseg.checkpoint.regroup import inherited_plan, split_kv_groups
from megaseg.checkpoint.weights import build_model, save_model_dir
from megaseg.config import ConfigError, HeadPlan, SegmentConfig
from tests.helpers import tiny_model
from tools import split_kv_groups as tool

LOCAL_SEGMENT = HeadPlan((("local", "segment"), ("segment", "local")))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def _model(plan=LOCAL_SEGMENT, seed=3):
    R = 5 if plan.count("retrieval") else 0
    return tiny_model(seed=seed, num_layers=2, num_heads=4, num_kv_heads=2, S=8, M=3, R=R, plan=plan)


@pytest.mark.parametrize("groups", [4, 2])
def test_split_computes_the_same_function(groups):
    """Segmented with local and segment groups, and with full attention: the same logits."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    sd, cfg = split_kv_groups(model.state_dict(), model.config, groups)
    assert cfg.num_kv_heads == groups and cfg.head_plan == inherited_plan(LOCAL_SEGMENT, groups // 2)
    split = build_model(cfg, sd)
    torch.testing.assert_close(_logits(split, ids), _logits(model, ids), rtol=0, atol=1e-5)
    full = SegmentConfig(64, 0, 0, 1)
    ref = build_model(model.config.replace(segment=full, head_plan=HeadPlan.all_local(2, 2)), model.state_dict())
    out = build_model(cfg.replace(segment=full, head_plan=HeadPlan.all_local(2, groups)), sd)
    torch.testing.assert_close(_logits(out, ids), _logits(ref, ids), rtol=0, atol=1e-5)


def test_split_copies_each_kv_head_next_to_itself():
    model = _model(plan=HeadPlan((("local", "retrieval"), ("retrieval", "local"))))
    sd, cfg = split_kv_groups(model.state_dict(), model.config, 4)
    d = model.config.head_dim
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        old, new = model.state_dict()[name], sd[name]
        assert new.shape == (4 * d, old.shape[1])
        for g in range(4):
            assert torch.equal(new[g * d:(g + 1) * d], old[(g // 2) * d:(g // 2 + 1) * d])
    assert cfg.head_plan.to_list() == [["local", "local", "retrieval", "retrieval"],
                                       ["retrieval", "retrieval", "local", "local"]]


def test_split_refuses_what_is_not_a_split():
    model = _model()
    with pytest.raises(ConfigError, match="multiple of the model's 2 KV groups"):
        split_kv_groups(model.state_dict(), model.config, 3)
    with pytest.raises(ConfigError, match="multiple of the model's 2 KV groups"):
        split_kv_groups(model.state_dict(), model.config, 1)
    with pytest.raises(ConfigError, match=r"must divide num_heads \(4\)"):
        split_kv_groups(model.state_dict(), model.config, 8)
    with pytest.raises(ConfigError, match="KV groups per layer|num_kv_heads"):
        split_kv_groups(model.state_dict(), model.config, 4, HeadPlan.all_local(2, 2))


def test_tool_writes_a_model_directory_with_the_new_plan(tmp_path, capsys):
    model = _model(plan=HeadPlan((("local", "local"), ("local", "retrieval"))))
    save_model_dir(tmp_path / "src", model.state_dict(), model.config)
    plan = [["local"] * 4, ["local", "local", "local", "retrieval"]]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rc = tool.main([str(tmp_path / "src"), str(tmp_path / "out"), "--kv-groups", "4",
                    "--head-plan-file", str(tmp_path / "plan.json")])
    assert rc == 0
    assert "2 -> 4 KV groups" in capsys.readouterr().out
    src = read_model(tmp_path / "out")
    assert src.config.num_kv_heads == 4 and src.config.head_plan.to_list() == plan
    assert src.config.segment == model.config.segment
    # a plan of the source's shape is refused with the shapes named
    rc = tool.main([str(tmp_path / "src"), str(tmp_path / "out2"), "--kv-groups", "4",
                    "--head-plan-file", str(tmp_path / "plan_bad.json")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "plan_bad.json").write_text(json.dumps([["local", "local"], ["local", "retrieval"]]))
    rc = tool.main([str(tmp_path / "src"), str(tmp_path / "out2"), "--kv-groups", "4",
                    "--head-plan-file", str(tmp_path / "plan_bad.json")])
    assert rc == 2 and "2 layers x 2 KV groups, the written model 2 x 4" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_retrieval_copies_keeps_the_last_copies(tmp_path, capsys):
    plan = HeadPlan((("local", "retrieval"), ("retrieval", "segment")))
    assert inherited_plan(plan, 2, 1).to_list() == [["local", "local", "local", "retrieval"],
                                                     ["local", "retrieval", "segment", "segment"]]
    assert inherited_plan(plan, 4, 2).modes[0] == ("local",) * 6 + ("retrieval",) * 2
    with pytest.raises(ConfigError, match="retrieval_copies=3 is invalid: must be 1..2"):
        inherited_plan(plan, 2, 3)
    model = _model(plan=plan)
    save_model_dir(tmp_path / "src", model.state_dict(), model.config)
    rc = tool.main([str(tmp_path / "src"), str(tmp_path / "out"), "--kv-groups", "4", "--retrieval-copies", "1",
                    "--plan-output", str(tmp_path / "plan.json")])
    assert rc == 0
    assert "retrieval groups 2 of 4 -> 2 of 8" in capsys.readouterr().out
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written == read_model(tmp_path / "out", weights=False).config.head_plan.to_list()
    assert written == inherited_plan(plan, 2, 1).to_list()
