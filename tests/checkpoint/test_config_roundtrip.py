"""Every field of every config dataclass survives every format it is written to.

Each config below sets every field to a value other than its default; a field added to a
dataclass without being added here fails `test_every_field_is_covered`.
"""
import dataclasses
import json

import pytest
import torch
import yaml

from megaseg.checkpoint.formats import read_model
from megaseg.checkpoint.weights import read_model_dir, save_model_dir
from megaseg.config import HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.hf.convert import write_hf_directory
from megaseg.hf_config import hf_config_dict, model_config_from_hf
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.arguments import PretrainConfig, parse_args

ROPE = RopeConfig(theta=500000.0, scaling_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                  original_max_position_embeddings=64)
SEGMENT = SegmentConfig(segment_length=32, tail_length=8, retrieval_length=16, tbptt_k=2,
                        retrieval_group_reduce="max")
PLAN = HeadPlan((("local", "retrieval", "segment"), ("segment", "local", "local"), ("retrieval", "retrieval", "local")))
MODEL = ModelConfig(vocab_size=77, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6, num_kv_heads=3,
                    head_dim=10, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True, rope=ROPE, segment=SEGMENT,
                    head_plan=PLAN)

PRETRAIN = dict(
    num_layers=3, hidden_size=48, ffn_hidden_size=80, num_attention_heads=6, num_query_groups=3, kv_channels=10,
    norm_epsilon=1e-6, rotary_base=500000.0, rope_scaling_type="llama3", rope_scaling_factor=4.0,
    rope_low_freq_factor=2.0, rope_high_freq_factor=8.0, rope_original_max_position_embeddings=64,
    untie_embeddings_and_output_weights=False, add_qkv_bias=True, init_method_std=0.01, vocab_size=77,
    segment_length=32, tail_length=8, retrieval_length=16, tbptt_k=2, retrieval_group_reduce="max",
    head_plan_preset="prior", long_range_layers=[0, 2], num_long_range_heads=2, long_range_heads=[1],
    head_plan_file="plan.json",
    seq_length=128, micro_batch_size=1, global_batch_size=8, train_iters=40, lr=1e-3, min_lr=1e-4,
    lr_decay_style="linear", lr_warmup_iters=3, lr_warmup_fraction=0.2, lr_warmup_init=1e-5, lr_decay_iters=30,
    weight_decay=0.05, optimizer="sgd", adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, sgd_momentum=0.5,
    clip_grad=0.5, bf16=False, seed=7, max_consecutive_skipped_steps=2, freeze_retrieval_qk=True,
    freeze_params=["decoder.layers.0.*", "embedding.*"],
    tensor_model_parallel_size=2, pipeline_model_parallel_size=3, context_parallel_size=1, use_distributed_optimizer=True,
    deepspeed=False,
    deepspeed_config="ds.json", use_te=False, attention_kernel="sdpa",
    recompute_granularity="full", recompute_method="block", recompute_num_layers=2, recompute_modules=[],
    data_path=["0.5", "a_text_document", "0.5", "b_text_document"], default_data_dir="elsewhere", split="90,5,5",
    loss_mask_data_path=["a_mask_document", "b_mask_document"],
    reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True,
    tokenizer_model="tok.model", tokenizer_type="SentencePieceTokenizer", data_cache_path="cache", save="out", save_interval=10, load="in",
    no_load_optim=True, no_load_rng=True, override_opt_param_scheduler=True, pretrained_checkpoint="llama",
    overwrite_checkpoints=True, keep_last_n=3, distributed_timeout_minutes=3.0, async_save=True,
    exit_signal_handler=False, exit_interval=20, exit_duration_in_mins=90.0, log_interval=2,
    tensorboard_dir="tb", eval_interval=10, eval_iters=3, log_segment_stats_interval=4,
)
# DeepSpeed and context parallelism run one pipeline stage: their flags are covered by
# variants with pipeline size 1.
VARIANTS = {"pipeline": PRETRAIN, "deepspeed": {**PRETRAIN, "pipeline_model_parallel_size": 1, "deepspeed": True,
                                                "reset_attention_mask": False, "reset_position_ids": False,
                                                "freeze_retrieval_qk": False, "freeze_params": []},
            "context": {**PRETRAIN, "pipeline_model_parallel_size": 1, "context_parallel_size": 2,
                        "recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None,
                        "recompute_modules": ["mlp"]}}


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_is_covered():
    assert set(PRETRAIN) == _fields(PretrainConfig) - {"config"}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(PretrainConfig)}
    left = {f for f in PRETRAIN if all(v[f] == defaults[f] for v in VARIANTS.values())}
    assert not left, f"PretrainConfig fields left at the default: {sorted(left)}"
    for obj in (MODEL, ROPE, SEGMENT):
        defaults = type(obj)()
        changed = {f for f in _fields(type(obj)) if getattr(obj, f) != getattr(defaults, f)}
        assert changed == _fields(type(obj)), f"{type(obj).__name__} fields left at the default"


def test_model_config_dict_and_json():
    assert ModelConfig.from_dict(json.loads(json.dumps(MODEL.to_dict()))) == MODEL


def test_model_config_through_a_megaseg_model_directory(tmp_path):
    sd = SegmentedLlamaForCausalLM(MODEL).state_dict()
    save_model_dir(tmp_path / "ms", sd, MODEL)
    assert read_model_dir(tmp_path / "ms", weights=False)[1] == MODEL
    assert read_model(tmp_path / "ms", weights=False).config == MODEL


@pytest.mark.parametrize("segmented", [True, False])
def test_model_config_through_a_hugging_face_config(tmp_path, segmented):
    assert model_config_from_hf(json.loads(json.dumps(hf_config_dict(MODEL, segmented=segmented)))) == MODEL
    sd = {k: v.to(torch.bfloat16) for k, v in SegmentedLlamaForCausalLM(MODEL).state_dict().items()}
    write_hf_directory(tmp_path / "hf", sd, MODEL, segmented=segmented)
    assert read_model(tmp_path / "hf", weights=False).config == MODEL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pretrain_config_through_yaml_and_a_checkpoint_dict(tmp_path, monkeypatch, variant):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(PLAN.to_list()))
    cfg = PretrainConfig(**VARIANTS[variant])
    assert cfg.to_dict() == {**VARIANTS[variant], "config": None}
    assert PretrainConfig(**cfg.to_dict()) == cfg  # the dict saved in every training checkpoint
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "config"}))
    from_yaml = parse_args(["--config", str(tmp_path / "run.yaml")])
    assert {**from_yaml.to_dict(), "config": None} == cfg.to_dict()
    # ... and the model it describes is exactly MODEL (the plan file wins over the preset).
    assert cfg.model_config(77) == MODEL
