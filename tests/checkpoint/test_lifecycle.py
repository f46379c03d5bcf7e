"""A checkpoint's life: pretrain at TP2 -> export -> transformers (model and tokenizer) and
generate; and the other way, a Hugging Face Llama -> --pretrained-checkpoint at TP2."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import HF_LLAMA, HF_MEGASEG, MEGASEG, TRAINING, detect_format, read_model
from megaseg.megatron import parallel

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pretrain" / "pretrain_gpt.py"
from tests.checkpoint.conftest import subprocess_env, torchrun as _torchrun


def _step_losses(stdout):
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("iteration ")]


@pytest.fixture(scope="module")
def one_process():
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    yield
    parallel.destroy_model_parallel()


def _training_forward(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the megatron-core model of a training checkpoint, loaded as a resuming run would."""
    from megaseg.checkpoint.training import load_training_checkpoint, read_training_common
    from megaseg.megatron.model import segment_forward
    from megaseg.training.arguments import PretrainConfig
    from megaseg.training.setup import setup_model_and_optimizer

    _, common = read_training_common(str(checkpoint))
    cfg = PretrainConfig(**{**common["args"], "tensor_model_parallel_size": 1})  # the run's config, whole
    model_config = cfg.model_config(common["model_config"]["vocab_size"])
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config)
    load_training_checkpoint(str(checkpoint), model, optimizer, scheduler, model_config=model_config.to_dict())
    with torch.no_grad():
        logits, _ = segment_forward(model, ids)
    return logits


def test_formats_are_detected_and_explained(tp2_checkpoint, tmp_path):
    assert detect_format(tp2_checkpoint) == TRAINING
    assert detect_format(tp2_checkpoint / "iter_0000002") == TRAINING
    src = read_model(tp2_checkpoint, weights=False)
    assert src.iteration == 2 and src.tokenizer.endswith("tokenizer.model") and src.config.num_layers == 2
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "iter_0000001").mkdir()
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt; pass one iter_"):
        detect_format(tmp_path / "loose")


def test_tp2_training_checkpoint_exports_to_transformers_and_generates_alike(tp2_checkpoint, tmp_path, one_process):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaseg.inference.tokenizer import TextTokenizer
    from tools import convert_hf, generate

    out = tmp_path / "hf"
    assert convert_hf.main(["export", str(tp2_checkpoint), str(out)]) == 0
    assert detect_format(out) == HF_MEGASEG
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 2
    ids = hf_tok(text, return_tensors="pt").input_ids
    ours = TextTokenizer.load(out)
    assert ids[0].tolist() == ours.encode(text)  # the run's sentencepiece model, through AutoTokenizer
    assert ids.shape[1] > 3 * 16  # several segments

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits
    ref_logits = _training_forward(tp2_checkpoint, ids)
    torch.testing.assert_close(hf_logits, ref_logits, atol=1e-5, rtol=1e-5)

    prompt = ids[:, :40]
    greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 40:].tolist()
    stdout = io.StringIO()
    argv = [str(tp2_checkpoint), "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--max-new-tokens", "12",
            "--ignore-eos", "--no-stream", "--no-echo"]
    from contextlib import redirect_stdout

    with redirect_stdout(stdout):
        assert generate.main(argv) == 0
    assert stdout.getvalue().strip() == f"[0] {ours.decode(greedy)}"


def test_pretrained_llama_at_tp2_first_loss_equals_transformers_segmented_loss(small_data, tmp_path):
    """HF Llama-3-style (GQA, llama3 rope) with the run's tokenizer -> continued pretraining at TP2."""
    from transformers import AutoModelForCausalLM

    from megaseg.config import SegmentConfig
    from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint
    from megaseg.segment_options import head_plan_from
    from megaseg.training.batches import get_batch
    from tests.hf.tiny_hf import hf_llama
    sys.path.insert(0, str(REPO / "pretrain"))
    import pretrain_gpt

    prefix, tokenizer = small_data
    llama = hf_llama("llama3", num_layers=2)
    llama.resize_token_embeddings(512)
    llama.config.bos_token_id, llama.config.eos_token_id = 2, 3  # the run's tokenizer's ids
    llama.config.rope_parameters["original_max_position_embeddings"] = 8  # scaling bites at 16-token segments
    llama.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    assert detect_format(tmp_path / "llama") == HF_LLAMA

    flags = ["--pretrained-checkpoint", str(tmp_path / "llama"), "--data-path", prefix, "--seq-length", "64", "--segment-length", "16",
             "--tail-length", "4", "--retrieval-length", "4", "--head-plan-preset", "interleaved",
             "--long-range-layers", "1", "--num-long-range-heads", "1", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "1", "--log-interval", "1", "--eval-iters", "0",
             "--split", "90,10,0", "--save", "none", "--tensorboard-dir", "none"]
    run = _torchrun(*flags, "--tensor-model-parallel-size", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"initialised from the pretrained weights of {tmp_path / 'llama'}" in run.stdout
    (first_loss,) = _step_losses(run.stdout)

    # The same global batch, and the imported model under transformers with the run's segmentation.
    cfg, _, _ = pretrain_gpt.apply_pretrained(pretrain_gpt.parse_args(flags + ["--tokenizer-model", tokenizer]))
    from megaseg.data.tokenizer import validate_tokenizer

    train, _ = pretrain_gpt.build_datasets(cfg, [prefix], validate_tokenizer(tokenizer))
    tokens, labels = get_batch(train, 0, 4, 64)
    plan = head_plan_from("interleaved", 2, 2, [1], 1)
    import_hf_checkpoint(tmp_path / "llama", tmp_path / "ms", SegmentConfig(16, 4, 4, 1), plan)
    export_hf_checkpoint(tmp_path / "ms", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert first_loss == pytest.approx(float(expected), abs=1e-4)


def test_pretrained_checkpoint_contradicting_flags_is_one_line(tmp_path, small_data):
    from tests.hf.tiny_hf import hf_llama

    prefix, tokenizer = small_data
    llama = hf_llama("llama2", num_layers=2)
    llama.save_pretrained(tmp_path / "llama")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pretrained-checkpoint", "llama", "--hidden-size", "64",
                           "--segment-length", "16", "--tail-length", "4", "--long-range-layers", "1"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hidden_size=64 is invalid: the pretrained checkpoint llama has hidden_size=32" in lines[0]


def test_export_keeps_every_config_field(tp2_checkpoint, tmp_path):
    from megaseg.hf.convert import export_hf_checkpoint

    export_hf_checkpoint(tp2_checkpoint, tmp_path / "hf")
    exported = read_model(tmp_path / "hf", weights=False).config
    assert exported == read_model(tp2_checkpoint, weights=False).config
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] == 2 and config["eos_token_id"] == 3  # the run's tokenizer's ids
    assert detect_format(tmp_path / "hf") == HF_MEGASEG and MEGASEG != HF_MEGASEG


def test_evaluation_loads_a_training_checkpoint_with_its_tokenizer(tp2_checkpoint):
    from megaseg.eval.loading import load_for_eval

    model, tok = load_for_eval(tp2_checkpoint)
    ids = torch.tensor([tok.encode("import os\nimport sys\n" * 8)])
    with torch.no_grad():
        ours = model(ids)[0]
        again = read_model(tp2_checkpoint).build()(ids)[0]
    assert torch.equal(ours, again) and tok.vocab_size == 512
