"""Every inference mode runs on every checkpoint format `read_model` accepts (pretraining
checkpoint, megaseg model directory, megaseg HF export, plain HF Llama/Qwen2/Mistral) and on
transformers models in memory, through one loader; `no_retrieval` is the checkpoint's
settings with retrieval groups `local` and R = 0."""
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

from megaseg.checkpoint.formats import HF_LLAMA, HF_MEGASEG, MEGASEG, TRAINING, detect_format, read_model
from megaseg.checkpoint.weights import save_model_dir
from megaseg.config import ConfigError, HeadPlan, SegmentConfig
from megaseg.eval.evaluator import perplexity, run_sequence
from megaseg.eval.loading import load_for_eval, reference_model
from megaseg.eval.modes import InferenceMode, installed, mode_from_dict
from megaseg.hf.convert import export_hf_checkpoint

from ..hf.tiny_hf import hf_family, hf_llama, load_tool

WORDS = "the a cat dog sat ran on under mat log red blue big small slowly quickly and then".split()
SENTENCES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) for i in range(200)]


def train_tokenizer(path: Path) -> Path:
    """A 60-piece sentencepiece model (BOS 1, EOS 2), ids below every tiny model's vocabulary."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def pretraining_checkpoint(root: Path, tokenizer_model: Path) -> Path:
    """The save directory of a 2-step in-process pretraining run (2 layers, S = 8, M = R = 4,
    layer 1 retrieving with KV group 0) that carries ``tokenizer_model``."""
    from megaseg.megatron import parallel
    from megaseg.training.trainer import pretrain
    from tests.training.synthetic import PatternDataset, tiny_config

    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    try:
        cfg = tiny_config(root, train_iters=2, eval_iters=0, tokenizer_model=str(tokenizer_model))
        pretrain(cfg, cfg.model_config(cfg.vocab_size), PatternDataset(16, 32), out=io.StringIO())
    finally:
        parallel.destroy_model_parallel()
    return root / "ckpt"


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    tok = train_tokenizer(root / "tok.model")
    paths = {"training": pretraining_checkpoint(root, tok)}
    src = read_model(paths["training"])
    save_model_dir(root / "ms", src.state_dict, src.config, hf=src.hf, tokenizer_from=tok)
    paths["megaseg"] = root / "ms"
    export_hf_checkpoint(paths["training"], root / "hf")
    paths["hf-megaseg"] = root / "hf"
    for name, model in (("llama", hf_llama("llama3", seed=2, num_layers=2)), ("qwen2", hf_family("qwen2", seed=3)),
                        ("mistral", hf_family("mistral", seed=4))):
        model.save_pretrained(root / name)
        (root / name / "tokenizer.model").write_bytes(tok.read_bytes())
        paths[name] = root / name
    (root / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    return root, paths


MODES = [InferenceMode("megaseg"), InferenceMode("no_retrieval", "no_retrieval"),
         InferenceMode("full", "full", chunk=8), InferenceMode("streaming", "streaming", sinks=2, window=6, chunk=8),
         InferenceMode("duo", "duo", sinks=2, window=6, chunk=8, full_heads={1: [0]})]
IDS = torch.randint(3, 60, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def _nll(model, mode, ids=IDS):
    with installed(model, mode) as m:
        return run_sequence(m, ids, mode.chunk_size(m)).nll


def test_formats_are_what_the_test_says(formats):
    _, paths = formats
    assert [detect_format(paths[k]) for k in ("training", "megaseg", "hf-megaseg", "llama", "qwen2", "mistral")] == \
        [TRAINING, MEGASEG, HF_MEGASEG, HF_LLAMA, HF_LLAMA, HF_LLAMA]


def test_every_mode_gives_the_same_results_on_the_pretraining_checkpoint_and_its_exports(formats):
    _, paths = formats
    runs = {}
    for fmt in ("training", "megaseg", "hf-megaseg"):
        model, tok = load_for_eval(paths[fmt])
        assert model.config.head_plan.to_list() == [["segment", "local"], ["retrieval", "local"]]
        # A pretraining run's model never saw a BOS, nor does its export; a model directory
        # without tokenizer_config.json keeps sentencepiece's (Llama's) default.
        assert (tok.encode("the cat")[0] == 1) == (fmt == "megaseg")
        runs[fmt] = {m.name: _nll(model, m) for m in MODES}
        res = perplexity(model, MODES[1], [IDS], bucket=8)
        assert res.mean_nll == pytest.approx(float(runs[fmt]["no_retrieval"].mean()), rel=1e-9)
    for fmt in ("megaseg", "hf-megaseg"):
        for name, nll in runs[fmt].items():
            torch.testing.assert_close(nll, runs["training"][name], rtol=1e-6, atol=1e-6, msg=f"{fmt} {name}")
    # Retrieval matters past the first segment; the modes differ from each other.
    nll = runs["hf-megaseg"]
    assert not torch.allclose(nll["megaseg"][8:], nll["no_retrieval"][8:])
    torch.testing.assert_close(nll["megaseg"][:8], nll["no_retrieval"][:8])  # segment 0: no retrieval yet
    assert not torch.allclose(nll["megaseg"], nll["full"]) and not torch.allclose(nll["full"], nll["streaming"])


def test_no_retrieval_is_the_plan_with_retrieval_groups_local_and_r_zero(formats):
    _, paths = formats
    model, _ = load_for_eval(paths["hf-megaseg"])
    S, M = model.config.segment.segment_length, model.config.segment.tail_length
    by_hand = InferenceMode("by_hand", segment=SegmentConfig(S, M, 0, 1),
                            head_plan=HeadPlan((("segment", "local"), ("local", "local"))))
    torch.testing.assert_close(_nll(model, InferenceMode("nr", "no_retrieval")), _nll(model, by_hand))
    # With the mode's own settings: their retrieval groups go too (and R > 0 goes to 0).
    own = dict(segment=SegmentConfig(16, 2, 6, 1), head_plan=HeadPlan((("retrieval", "local"), ("local", "segment"))))
    nr = InferenceMode("nr", "no_retrieval", **own)
    assert nr.settings(model.config) == (SegmentConfig(16, 2, 0, 1), HeadPlan((("local", "local"), ("local", "segment"))))
    assert mode_from_dict({"name": "x", "kind": "no_retrieval"}).kind == "no_retrieval"
    # Without retrieval the megaseg mode with R > 0 is refused; the no_retrieval mode runs.
    with pytest.raises(ConfigError, match="mode 'm'.*retrieval_length"):
        _nll(model, InferenceMode("m", segment=SegmentConfig(8, 4, 4, 1), head_plan=by_hand.head_plan))
    _nll(model, InferenceMode("nr", "no_retrieval", segment=SegmentConfig(8, 4, 4, 1), head_plan=by_hand.head_plan))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_plain_hf_directory_runs_every_mode_and_megaseg_is_full_attention(formats, family):
    """No segment settings: one segment of its max context (capped at Mistral's 48-token
    window), so within it every segmented mode equals transformers' own forward."""
    from transformers import AutoModelForCausalLM

    _, paths = formats
    model, tok = load_for_eval(paths[family])
    window = {"mistral": 48}.get(family)
    assert model.config.segment.segment_length == (window or json.loads(
        (paths[family] / "config.json").read_text())["max_position_embeddings"])
    assert tok.encode("the cat")[0] == 1  # an HF model's sentencepiece tokenizer keeps its BOS
    hf = AutoModelForCausalLM.from_pretrained(paths[family]).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([IDS])).logits[0, :-1].double()
    want = -torch.log_softmax(logits, -1).gather(1, torch.tensor(IDS[1:])[:, None]).squeeze(1)
    for mode in MODES:
        got = _nll(model, mode)
        assert torch.isfinite(got).all()
        if mode.kind in ("megaseg", "no_retrieval", "full"):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=mode.name)
    # The transformers model itself runs in every mode, as its reference copy.
    for mode in MODES:
        torch.testing.assert_close(_nll(hf, mode), _nll(model, mode), rtol=1e-5, atol=1e-5)


def test_a_megaseg_export_loaded_with_transformers_runs_every_mode(formats):
    from transformers import AutoModelForCausalLM

    _, paths = formats
    hf = AutoModelForCausalLM.from_pretrained(paths["hf-megaseg"], trust_remote_code=True).eval()
    ours, _ = load_for_eval(paths["hf-megaseg"])
    assert reference_model(ours) is ours
    for mode in MODES:
        torch.testing.assert_close(_nll(hf, mode), _nll(ours, mode), rtol=1e-6, atol=1e-6)
    res = perplexity(hf, MODES[0], [IDS], bucket=8)
    assert res.mean_nll == pytest.approx(float(_nll(ours, MODES[0]).mean()), rel=1e-6)
    with pytest.raises(ConfigError, match="not a model megaseg can evaluate"):
        with installed(torch.nn.Linear(2, 2), MODES[0]):
            pass


def test_evaluate_tool_runs_an_hf_export_and_a_plain_llama_with_no_retrieval(formats, tmp_path, capsys):
    root, paths = formats
    cfg = {"checkpoints": {"export": str(paths["hf-megaseg"]), "llama": str(paths["llama"])},
           "corpus": str(root / "corpus.txt"), "lengths": [40], "tasks": [], "perplexity": {"documents": 1, "bucket": 8},
           "modes": [{"name": "megaseg", "kind": "megaseg"}, {"name": "no_retrieval", "kind": "no_retrieval"},
                     {"name": "full", "kind": "full", "chunk": 8}],
           "output": str(tmp_path / "out"), "threads": 1}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert load_tool("evaluate").main([str(tmp_path / "eval.yaml")]) == 0, capsys.readouterr().err
    rows = {(r["model"], r["mode"]): r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert set(rows) == {(c, m) for c in ("export", "llama") for m in ("megaseg", "no_retrieval", "full")}
    assert all(r["ppl"] > 1 for r in rows.values())
    assert rows[("export", "megaseg")]["ppl"] != rows[("export", "no_retrieval")]["ppl"]
    # A plain Llama runs one segment (full attention) in both segmented modes.
    assert rows[("llama", "megaseg")]["ppl"] == pytest.approx(rows[("llama", "full")]["ppl"], rel=1e-5)
