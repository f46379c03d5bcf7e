"""tools/generate.py: text in, the prompt echoed and the streamed continuation out, timing and
memory report at the end."""
import io

import pytest
import sentencepiece as spm

from megaseg.config import SegmentConfig
from megaseg.checkpoint.formats import load_model
from megaseg.hf.convert import export_hf_checkpoint, import_hf_checkpoint
from megaseg.inference import InferenceEngine, SamplingConfig
from megaseg.inference.tokenizer import TextTokenizer

from ..hf.tiny_hf import hf_llama, load_tool

generate = load_tool("generate")

WORDS = "the a cat dog sat ran on under mat log red blue big small slowly quickly and then".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A megaseg checkpoint with a 60-piece sentencepiece tokenizer (ids < the model's vocab)."""
    root = tmp_path_factory.mktemp("gen")
    hf_llama("llama3", seed=8).save_pretrained(root / "hf")
    sentences = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) for i in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (root / "hf" / "tokenizer.model").write_bytes(buf.getvalue())
    import_hf_checkpoint(root / "hf", root / "ms", SegmentConfig(8, 3, 0, 1), None)
    return root


def _report(err):
    lines = [line for line in err.splitlines() if line.split(":")[0] in ("prefill", "decode", "peak memory")]
    assert [line.split(":")[0] for line in lines] == ["prefill", "decode", "peak memory"], err
    return lines


def _completions(out):
    """{row: completion text} of a batch printed with the prompts echoed."""
    return {int(line[1:line.index("]")]): line.split("] completion: ", 1)[1]
            for line in out.splitlines() if "] completion: " in line}


def test_echoes_the_prompt_then_streams_the_greedy_completion(checkpoint, capsys):
    prompt = "the big cat sat on the red mat and then"
    argv = [str(checkpoint / "ms"), "--prompt", prompt, "--max-new-tokens", "20", "--ignore-eos"]
    assert generate.main(argv) == 0
    out, err = capsys.readouterr()
    model, _ = load_model(checkpoint / "ms")
    tok = TextTokenizer.load(checkpoint / "ms" / "tokenizer.model")
    ids = InferenceEngine(model).generate([tok.encode(prompt)], 20).tokens[0]
    assert tok.decode(ids) and prompt not in tok.decode(ids)
    assert out == f"prompt: {prompt}\ncompletion: {tok.decode(ids)}\n"  # the prompt first, then the continuation
    assert "decode: 20 tokens" in _report(err)[1]
    assert generate.main(argv + ["--no-echo"]) == 0  # the continuation alone
    out, err = capsys.readouterr()
    assert out == tok.decode(ids) + "\n" and prompt not in out
    _report(err)


def test_batch_from_files_and_ids_with_sampling_and_segment_overrides(checkpoint, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a small dog ran under the log")
    argv = [str(checkpoint / "ms"), "--prompt-file", str(tmp_path / "p.txt"), "--prompt-ids", "1,5,9,13",
            "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "10", "--top-p", "0.9", "--seed", "3",
            "--segment-length", "4", "--tail-length", "2", "--ignore-eos"]
    assert generate.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    model, _ = load_model(checkpoint / "ms", segment=SegmentConfig(4, 2, 0, 1))
    tok = TextTokenizer.load(checkpoint / "ms")
    prompts = [tok.encode("a small dog ran under the log"), [1, 5, 9, 13]]
    want = InferenceEngine(model).generate(prompts, 6, SamplingConfig(0.9, 10, 0.9, 3)).tokens
    assert lines == ["[0] prompt: a small dog ran under the log", "[0] completion: " + tok.decode(want[0]),
                     "[1] prompt: " + tok.decode([1, 5, 9, 13]), "[1] completion: " + tok.decode(want[1])]
    assert "S=4 M=2 R=0" in err
    _report(err)
    assert generate.main(argv + ["--no-echo"]) == 0
    assert capsys.readouterr().out.splitlines() == ["[0] " + tok.decode(want[0]), "[1] " + tok.decode(want[1])]


def test_exported_directory_and_token_ids_without_a_tokenizer(checkpoint, capsys):
    export_hf_checkpoint(checkpoint / "ms", checkpoint / "out")
    assert generate.main([str(checkpoint / "out"), "--prompt-ids", "1,7,3", "--max-new-tokens", "5", "--no-stream",
                          "--tokenizer", str(checkpoint / "ms")]) == 0
    out, _ = capsys.readouterr()
    tok = TextTokenizer.load(checkpoint / "ms")
    assert out.startswith(f"[0] prompt: {tok.decode([1, 7, 3])}\n[0] completion: ")


@pytest.mark.parametrize("argv_tail, needle", [
    ([], "no prompt"),
    (["--prompt-ids", "1,x"], "--prompt-ids='1,x'"),
    (["--prompt-ids", "1,500"], "token ids outside"),
    (["--prompt", "hi", "--top-p", "0"], "top_p=0.0"),
    (["--prompt", "hi", "--dtype", "int8"], "dtype='int8'"),
])
def test_bad_inputs_are_one_line_errors(checkpoint, capsys, argv_tail, needle):
    assert generate.main([str(checkpoint / "ms"), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


# ---- overrides: --no-retrieval, --full-attention; BOS as the model was trained ----------------
def _overridden_lines(err):
    return [line for line in err.splitlines() if line.startswith("# overridden")]


@pytest.fixture(scope="module")
def retrieving(checkpoint):
    """The same weights without a tokenizer (completions print as ids), as a plain HF directory
    and imported with S = 8, M = 3, R = 4 and layer 1 retrieving with KV group 0."""
    from megaseg.config import HeadPlan

    hf_llama("llama3", seed=8).save_pretrained(checkpoint / "hf_ids")
    plan = HeadPlan((("segment", "local"), ("retrieval", "local"), ("segment", "local")))
    import_hf_checkpoint(checkpoint / "hf_ids", checkpoint / "ret", SegmentConfig(8, 3, 4, 1), plan)
    return checkpoint / "ret"


def test_no_retrieval_runs_retrieval_groups_as_local_and_says_so(retrieving, capsys):
    from megaseg.config import HeadPlan

    prompt = [5, 9, 13, 7, 21, 3, 17, 11, 30, 8, 12, 40, 22, 6, 19, 25, 33, 9, 14, 10]  # three segments
    argv = [str(retrieving), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8", "--ignore-eos",
            "--no-stream"]
    assert generate.main(argv + ["--no-retrieval"]) == 0
    out, err = capsys.readouterr()
    local = HeadPlan((("segment", "local"), ("local", "local"), ("segment", "local")))
    model, _ = load_model(retrieving, segment=SegmentConfig(8, 3, 0, 1), head_plan=local)
    want = InferenceEngine(model).generate([prompt], 8).tokens[0]
    assert out.splitlines() == ["[0] prompt: " + " ".join(map(str, prompt)),  # ids: no tokenizer
                                "[0] completion: " + " ".join(map(str, want))]
    assert _overridden_lines(err) == ["# overridden (--no-retrieval): running S=8 M=3 R=0, plan 4 local / 0 retrieval / "
                                      "2 segment instead of the checkpoint's S=8 M=3 R=4, plan 3 local / 1 retrieval / "
                                      "2 segment"]
    assert generate.main(argv) == 0  # the checkpoint's own settings: retrieval changes the completion
    out_own, err = capsys.readouterr()
    assert not _overridden_lines(err) and _completions(out_own) != _completions(out)


def test_full_attention_is_one_segment_of_the_max_context(checkpoint, retrieving, capsys):
    from transformers import AutoModelForCausalLM
    import torch

    prompt = [5, 9, 13, 7, 21, 3, 17, 11, 30, 8, 12, 40, 22, 6, 19, 25, 33, 9, 14, 10]
    argv = ["--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6", "--ignore-eos", "--no-stream",
            "--full-attention"]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint / "hf_ids").eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 20:].tolist()
    for path in (retrieving, checkpoint / "hf_ids"):  # a megaseg directory and the plain HF Llama (no settings of its own)
        assert generate.main([str(path), *argv]) == 0
        out, err = capsys.readouterr()
        assert _completions(out) == {0: " ".join(map(str, want))}
        assert "S=256 M=0 R=0" in err  # the Llama's max_position_embeddings
        assert len(_overridden_lines(err)) == (path == retrieving)
    assert generate.main([str(retrieving), *argv, "--segment-length", "64"]) == 0
    assert "S=64 M=0 R=0, plan 6 local / 0 retrieval / 0 segment" in _overridden_lines(capsys.readouterr().err)[0]


@pytest.mark.parametrize("argv_tail, needle", [
    (["--full-attention", "--retrieval-length", "4"], "--retrieval-length is invalid with --full-attention"),
    (["--no-retrieval", "--retrieval-length", "4"], "--retrieval-length=4 is invalid with --no-retrieval"),
])
def test_contradicting_overrides_are_one_line_errors(retrieving, capsys, argv_tail, needle):
    assert generate.main([str(retrieving), "--prompt-ids", "1,2", *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_text_of_a_pretraining_checkpoint_starts_without_bos(tmp_path, capsys):
    """The run's samples had no BOS, so generate.py adds none (an HF import keeps its BOS)."""
    from ..eval.test_modes_any_checkpoint import pretraining_checkpoint, train_tokenizer

    tok = train_tokenizer(tmp_path / "tok.model")
    ckpt = pretraining_checkpoint(tmp_path, tok)
    prompt = "the big cat sat on the red mat"
    n = len(TextTokenizer.load(tok, add_bos=False).encode(prompt))
    assert generate.main([str(ckpt), "--prompt", prompt, "--max-new-tokens", "2", "--no-stream"]) == 0
    assert f"1 prompt(s) of [{n}] tokens" in capsys.readouterr().err
    assert generate.main([str(ckpt), "--prompt", prompt, "--max-new-tokens", "2", "--no-stream",
                          "--tokenizer", str(tok)]) == 0  # another path to the same tokenizer: same model, no BOS
    assert f"1 prompt(s) of [{n}] tokens" in capsys.readouterr().err


def test_document_reset_continues_the_last_document_as_if_alone(checkpoint, capsys):
    """--document-reset on: a prompt of two documents (eos = 2 between them) completes as the
    second alone; off (the default for this checkpoint) the first one changes the completion."""
    first, second = "3,9,14,22,30,41,5,17,8,26,33", "11,4,27,19,35,6,23,12,40,15"
    base = [str(checkpoint / "ms"), "--max-new-tokens", "12", "--ignore-eos", "--no-stream", "--no-echo"]
    outs = []
    for prompt, reset in ((f"{first},2,{second}", "on"), (second, "off"), (f"{first},2,{second}", "off")):
        assert generate.main(base + ["--prompt-ids", prompt, "--document-reset", reset]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] != outs[1]
