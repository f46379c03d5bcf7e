"""Model families as data: Qwen2 (q/k/v biases) and Mistral (sliding window) through import,
the stock transformers forward, export, and continued pretraining with a Hugging Face
tokenizer (tokenizer.json only, as Llama-3.x and Qwen ship)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import read_model
from megaseg.config import HeadPlan, SegmentConfig
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint
from tests.hf.tiny_hf import hf_family, hf_llama, hf_tokenizer

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("qwen2", "mistral")


def _ids(n, vocab=101, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_at_one_segment_equals_stock_transformers(tmp_path, family):
    hf = hf_family(family, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    # S + M = 40 <= Mistral's 48-token window; T = 32 <= S: plain causal attention.
    cfg = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(32, 8, 0, 1), None)
    assert cfg.qkv_bias == (family == "qwen2")
    model = read_model(tmp_path / "ms").build()
    ids = _ids(32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_back_to_itself_with_every_config_field(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf = hf_family(family, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    plan = HeadPlan.interleaved(2, hf.config.num_key_value_heads, [1], 1)
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(16, 4, 8, 1), plan)
    export_hf_checkpoint(tmp_path / "ms", tmp_path / "plain", segmented=False)
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    exported = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert exported["model_type"] == family and exported["architectures"] == source["architectures"]
    for key in ("max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "rope_parameters"):
        assert exported.get(key) == source.get(key), key
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(stock) is type(hf)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(stock.state_dict()[name], tensor), name
    # The segmented export runs the family's weights (biases included) through the operator.
    export_hf_checkpoint(tmp_path / "ms", tmp_path / "seg")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "seg", trust_remote_code=True).eval()
    ids = _ids(40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, read_model(tmp_path / "ms").build()(ids)[0], atol=1e-5, rtol=1e-5)
    assert read_model(tmp_path / "seg", weights=False).config == read_model(tmp_path / "ms", weights=False).config


def test_mistral_window_is_honoured_or_refused(tmp_path):
    hf_family("mistral").save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError) as info:  # S + M = 56 > 48: a local head would see past the window
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(48, 8, 0, 1), None)
    message = str(info.value)
    assert "\n" not in message and "sliding_window=48" in message and "<= 48" in message
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ok", SegmentConfig(40, 8, 0, 1), None)  # S + M = 48 fits


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_configs_a_family_cannot_run_are_one_line_errors(tmp_path, change, field):
    hf_llama("llama2", num_layers=1).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as info:
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "ms", SegmentConfig(16, 4, 0, 1), None)
    assert field in str(info.value) and "\n" not in str(info.value)


def _corpus_texts():
    from megaseg.data.corpus import stdlib_documents

    return [d.text for d in stdlib_documents(max_bytes=300_000)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory):
    """A model of the family whose tokenizer is only tokenizer.json (Qwen's: eos = pad, no bos;
    Mistral's: bos and eos), its JSONL data tokenized by preprocess_data.py, and a 1-step
    continued-pretraining run from it at TP 2."""
    from tests.checkpoint.conftest import torchrun
    from tools import preprocess_data

    family = request.param
    root = tmp_path_factory.mktemp(family)
    texts = _corpus_texts()
    model = hf_family(family, seed=4, vocab_size=320)
    if family == "qwen2":
        hf_tokenizer(root / "hf", texts, vocab_size=300, bos=None, eos="<|endoftext|>", pad="<|endoftext|>")
        model.config.eos_token_id = model.config.pad_token_id = 0  # <|endoftext|> is the tokenizer's first id
    else:
        hf_tokenizer(root / "hf", texts, vocab_size=300, bos="<s>", eos="</s>")
        model.config.bos_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(root / "hf")
    with open(root / "data.jsonl", "w") as fh:
        for text in texts[:40]:
            fh.write(json.dumps({"text": text}) + "\n")
    assert preprocess_data.main(["--input", str(root / "data.jsonl"), "--tokenizer-model", str(root / "hf"),
                                 "--output-prefix", str(root / "data"), "--append-eod"]) == 0
    flags = ["--pretrained-checkpoint", str(root / "hf"), "--data-path", str(root / "data_text_document"),
             "--seq-length", "64", "--segment-length", "16", "--tail-length", "4", "--retrieval-length", "4",
             "--head-plan-preset", "interleaved", "--long-range-layers", "1", "--num-long-range-heads", "1",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--log-interval", "1",
             "--eval-iters", "0", "--split", "100,0,0", "--lr", "1e-9", "--min-lr", "1e-10", "--save", "ckpt",
             "--tensorboard-dir", "none"]
    run = torchrun(*flags, "--tensor-model-parallel-size", "2", cwd=root)
    assert run.returncode == 0, run.stderr
    return family, root, flags, run


def test_family_with_hf_tokenizer_continues_pretraining_at_tp2(family_run):
    """First-step loss = the transformers-side segmented loss of the same batch; the export's
    logits equal the training checkpoint's forward; its tokenizer gives the run's ids; the base
    model's config fields survive."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaseg.data.tokenizer import HuggingFaceTokenizer
    from megaseg.training.batches import get_batch

    sys.path.insert(0, str(REPO / "pretrain"))
    import pretrain_gpt

    family, root, flags, run = family_run
    first_loss = float(next(l for l in run.stdout.splitlines() if l.startswith("iteration ")).split("| loss ")[1].split()[0])
    cfg, _, _ = pretrain_gpt.apply_pretrained(pretrain_gpt.parse_args(flags))
    tok = HuggingFaceTokenizer(root / "hf")
    train, _ = pretrain_gpt.build_datasets(cfg, [str(root / "data_text_document")], tok)
    tokens, labels = get_batch(train, 0, 4, 64)

    plan = HeadPlan.interleaved(2, 2, [1], 1)
    import_hf_checkpoint(root / "hf", root / "ms", SegmentConfig(16, 4, 4, 1), plan)
    export_hf_checkpoint(root / "ms", root / "base_seg")
    base = AutoModelForCausalLM.from_pretrained(root / "base_seg", trust_remote_code=True).eval()
    with torch.no_grad():
        logits = base(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert first_loss == pytest.approx(float(expected), abs=1e-4)

    # lr 1e-9: the checkpoint holds the base weights up to 1e-9; its export is the run's model.
    export_hf_checkpoint(root / "ckpt", root / "out")
    out = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(out(tokens).logits, read_model(root / "ckpt").build()(tokens)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out(tokens).logits, logits, atol=1e-5, rtol=1e-5)
    text = "def main():\n    return 42\n"
    assert AutoTokenizer.from_pretrained(root / "out")(text).input_ids == tok.tokenize(text)
    config = json.loads((root / "out" / "config.json").read_text())
    source = json.loads((root / "hf" / "config.json").read_text())
    for key in ("max_position_embeddings", "eos_token_id", "bos_token_id", "sliding_window"):
        assert config[key] == source[key], key
    assert config["megaseg"]["family"] == family and config["megaseg"]["qkv_bias"] is (family == "qwen2")
    assert (root / "ckpt" / "iter_0000001" / "tokenizer.json").is_file()


def test_a_tokenizer_that_is_not_the_models_is_refused(family_run, small_data, tmp_path):
    """Another tokenizer beside the checkpoint: one line, exit 2, naming both sides."""
    family, root, flags, _ = family_run
    _, sp_model = small_data
    # Qwen2 (eos 0): a tokenizer whose eos is 1; Mistral (bos 0, eos 1): one with no bos.
    other = hf_tokenizer(tmp_path / "other", _corpus_texts()[:2], vocab_size=300,
                         bos="<s>" if family == "qwen2" else None, eos="</s>")
    mismatch, declared = ("its eos id is 1", "eos_token_id=0") if family == "qwen2" else ("its bos id is None", "bos_token_id=0")
    for tokenizer, expected in ((sp_model, "it has 512 tokens, the pretrained checkpoint"),
                                (other, f"{mismatch}, the pretrained checkpoint")):
        proc = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_gpt.py"), *flags,
                               "--tokenizer-model", str(tokenizer), "--save", "none"],
                              cwd=root, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], lines
    assert declared in lines[0]
