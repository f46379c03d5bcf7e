"""--freeze-retrieval-qk: the retrieval groups' query and key rows stay exactly where they started."""
import pytest
import torch

from megaseg.config import ConfigError
from megaseg.training.batches import rank_microbatches
from megaseg.training.engines import select_engine, train_step
from megaseg.training.freeze import global_name, qk_rows
from megaseg.training.setup import setup_model_and_optimizer
from tests.training.synthetic import PatternDataset, tiny_config

TRAIN = PatternDataset(16, 32, seed=0)


def test_qk_rows_pick_the_query_and_key_rows_of_retrieval_groups():
    # 2 query heads per group, head_dim 3: a group is q (6 rows), k (3), v (3)
    assert qk_rows(("local", "retrieval"), 2, 3) == list(range(12, 21))
    assert qk_rows(("retrieval", "local", "retrieval"), 2, 3) == list(range(0, 9)) + list(range(24, 33))
    assert qk_rows(("local", "local"), 2, 3) == []


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_frozen_rows_keep_their_values_while_the_rest_trains(model_parallel, distributed_optimizer):
    # layer 1, group 1 of 2 retrieves
    cfg = tiny_config(freeze_retrieval_qk=True, use_distributed_optimizer=distributed_optimizer, add_qkv_bias=True,
                      head_plan_preset="prior", long_range_heads=[1])
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    engine = select_engine(cfg, model, bf16=False)
    assert engine.frozen.described == ["layer 1 group(s) 1 query/key rows"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        metrics = train_step(engine, optimizer, scheduler, rank_microbatches(TRAIN, 4 * step, cfg))
        assert metrics.update_successful
    after = dict(model.named_parameters())
    hpg, D = 2, 8  # 4 heads / 2 groups, hidden 32 / 4 heads
    group = (hpg + 2) * D
    for name in ("weight", "bias"):
        key = next(k for k in after if k.endswith(f"layers.1.self_attention.linear_qkv.{name}"))
        frozen = slice(group, group + (hpg + 1) * D)  # group 1: its query and key rows
        torch.testing.assert_close(after[key][frozen], before[key][frozen], rtol=0, atol=0)
        assert not torch.equal(after[key][group + (hpg + 1) * D:], before[key][group + (hpg + 1) * D:])  # its values
        assert not torch.equal(after[key][:group], before[key][:group])  # the local group
        key0 = key.replace("layers.1.", "layers.0.")
        assert not torch.equal(after[key0], before[key0])  # layer 0 has no retrieval group
    assert engine.frozen.numel == (hpg + 1) * D * (32 + 1)


def test_frozen_parameters_by_name_keep_their_values(model_parallel):
    cfg = tiny_config(freeze_params=["embedding.*", "decoder.layers.0.*", "decoder.layers.1.input_layernorm.*"])
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    engine = select_engine(cfg, model, bf16=False)
    assert engine.frozen.described[0] == "embedding.word_embeddings.weight"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        assert train_step(engine, optimizer, scheduler, rank_microbatches(TRAIN, 4 * step, cfg)).update_successful
    frozen = set(engine.frozen.described)
    assert any(".layers.0." in n for n in frozen) and "decoder.layers.1.input_layernorm.weight" in frozen
    for name, param in model.named_parameters():
        if global_name(name, [0, 1]) in frozen:
            torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
        else:
            assert not torch.equal(param, before[name]), name
    assert global_name("module.decoder.layers.0.mlp.linear_fc1.weight", [2, 3]) == "decoder.layers.2.mlp.linear_fc1.weight"


def test_freeze_needs_a_retrieval_group_and_megatrons_optimizer(model_parallel):
    cfg = tiny_config(freeze_retrieval_qk=True, head_plan_preset="local", retrieval_length=0)
    model, _, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    with pytest.raises(ConfigError, match="no retrieval KV group"):
        select_engine(cfg, model, bf16=False)
    with pytest.raises(ConfigError, match="freeze_retrieval_qk"):
        tiny_config(freeze_retrieval_qk=True, deepspeed=True)
    cfg = tiny_config(freeze_params=["decoder.layers.7.*"])
    model, _, _ = setup_model_and_optimizer(cfg, cfg.model_config(cfg.vocab_size))
    with pytest.raises(ConfigError, match="no parameter name matches"):
        select_engine(cfg, model, bf16=False)
