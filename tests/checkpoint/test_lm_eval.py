"""An exported training checkpoint under lm-eval's Hugging Face backend, on the local task
that ships in examples/lm_eval: lm-eval's log-likelihoods equal megaseg's own."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens given the context, split into
    tokens the way lm-eval splits them (whole string encoded with the tokenizer's BOS,
    context tokens removed)."""
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_exported_checkpoint_runs_under_lm_eval_hf_backend(tp2_checkpoint, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaseg.hf.convert import export_hf_checkpoint

    export_hf_checkpoint(tp2_checkpoint, tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (REPO / "examples/lm_eval/python_completion.yaml").read_text()
    (tasks / "python_completion.yaml").write_text(
        yaml.replace("examples/lm_eval/python_completion.jsonl", str(REPO / "examples/lm_eval/python_completion.jsonl")))
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
        tasks=["python_completion"], task_manager=TaskManager(include_path=str(tasks)), batch_size=4,
        device="cpu", log_samples=True)
    samples = result["samples"]["python_completion"]
    assert len(samples) == 12

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    correct = 0
    for sample in samples[:4]:
        doc = sample["doc"]
        ours = [_our_loglikelihood(model, tok, doc["context"], c) for c in doc["choices"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
    for sample in samples:
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        correct += int(max(range(len(theirs)), key=theirs.__getitem__) == sample["doc"]["answer"])
    assert result["results"]["python_completion"]["acc,none"] == pytest.approx(correct / len(samples))
