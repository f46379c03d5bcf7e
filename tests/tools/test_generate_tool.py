"""tools/generate.py: text in, streamed text out, timing and memory report at the end."""
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


def test_streams_the_greedy_completion_of_a_text_prompt(checkpoint, capsys):
    prompt = "the big cat sat on the red mat and then"
    assert generate.main([str(checkpoint / "ms"), "--prompt", prompt, "--max-new-tokens", "20", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    model, _ = load_model(checkpoint / "ms")
    tok = TextTokenizer.load(checkpoint / "ms" / "tokenizer.model")
    ids = InferenceEngine(model).generate([tok.encode(prompt)], 20).tokens[0]
    assert out.rstrip("\n") == tok.decode(ids)
    assert "decode: 20 tokens" in _report(err)[1]


def test_batch_from_files_and_ids_with_sampling_and_segment_overrides(checkpoint, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a small dog ran under the log")
    argv = [str(checkpoint / "ms"), "--prompt-file", str(tmp_path / "p.txt"), "--prompt-ids", "1,5,9,13",
            "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "10", "--top-p", "0.9", "--seed", "3",
            "--segment-length", "4", "--tail-length", "2", "--ignore-eos"]
    assert generate.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line[:3] for line in lines] == ["[0]", "[1]"]
    model, _ = load_model(checkpoint / "ms", segment=SegmentConfig(4, 2, 0, 1))
    tok = TextTokenizer.load(checkpoint / "ms")
    prompts = [tok.encode("a small dog ran under the log"), [1, 5, 9, 13]]
    want = InferenceEngine(model).generate(prompts, 6, SamplingConfig(0.9, 10, 0.9, 3)).tokens
    assert lines[1] == "[1] " + tok.decode(want[1])
    assert "S=4 M=2 R=0" in err
    _report(err)


def test_exported_directory_and_token_ids_without_a_tokenizer(checkpoint, capsys):
    export_hf_checkpoint(checkpoint / "ms", checkpoint / "out")
    assert generate.main([str(checkpoint / "out"), "--prompt-ids", "1,7,3", "--max-new-tokens", "5", "--no-stream",
                          "--tokenizer", str(checkpoint / "ms")]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("[0] ")


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
