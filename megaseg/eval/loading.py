"""The one entry point that turns a checkpoint into (model, tokenizer) for evaluation.

Every evaluator and tool loads through ``load_for_eval`` (a path) or ``reference_model``
(a path or a model object): whatever the format — a pretraining checkpoint at any layout,
a megaseg model directory, a megaseg HF export, a plain HF Llama/Qwen2/Mistral directory,
or a transformers model already in memory — evaluation runs megaseg's reference model
(``SegmentedLlamaForCausalLM``, built by ``ModelSource.build()``), whose config is a
``ModelConfig`` every inference mode reads. Supporting another format means changing
``megaseg.checkpoint.formats.read_model`` only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megaseg.checkpoint.errors import CheckpointError
from megaseg.checkpoint.formats import HF_LLAMA, detect_format, read_model
from megaseg.config import HeadPlan, ModelConfig, SegmentConfig
from megaseg.inference.tokenizer import TextTokenizer, model_adds_bos

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS 256, EOS 257 (vocabulary 258).

    For small test models (a checkpoint directory with byte_tokenizer.json): it needs no
    training and encodes any text the same way in every piece, so needles and haystack lines
    concatenate exactly.
    """

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory, BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "bos_id": 256, "eos_id": 257}) + "\n")


def load_tokenizer(path: str | Path, add_bos: bool | None = None):
    """ByteTokenizer when ``path`` holds byte_tokenizer.json, else a sentencepiece or
    tokenizer.json tokenizer (``add_bos``: see `TextTokenizer.load`); CheckpointError (one
    line) when there is none."""
    p = Path(path)
    if p.is_dir() and (p / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise CheckpointError(f"{p}: checkpoint has no tokenizer (tokenizer.model, tokenizer.json or "
                              f"{BYTE_TOKENIZER_FILE}); pass a tokenizer path")
    return TextTokenizer.load(p, add_bos=add_bos)


def eval_settings(path: str | os.PathLike) -> tuple[SegmentConfig | None, HeadPlan | None]:
    """Segment settings and plan evaluation gives a checkpoint: its own (None, None), or for
    a plain HF directory, which has none, full attention (one segment as long as its max
    context, every KV group `local`, M = R = 0) — the model as it was trained; a mode's
    ``segment``/``head_plan`` then say how to segment it."""
    if detect_format(path) != HF_LLAMA:
        return None, None
    from megaseg.segment_options import checkpoint_settings, full_attention

    ckpt = checkpoint_settings(path)
    return full_attention(ckpt.num_layers, ckpt.num_kv_groups, ckpt.max_context)


def load_source(path: str | os.PathLike, weights: bool = True, segment: SegmentConfig | None = None,
                head_plan: HeadPlan | None = None):
    """`read_model` of ``path`` with evaluation's settings (`eval_settings`) unless given."""
    if segment is None and head_plan is None:
        segment, head_plan = eval_settings(path)
    return read_model(path, weights=weights, segment=segment, head_plan=head_plan)


def load_weights(path: str | os.PathLike, segment: SegmentConfig | None = None, head_plan: HeadPlan | None = None):
    """The reference model of a checkpoint in any format `megaseg.checkpoint.formats` reads
    (pretraining checkpoint at any layout, megaseg model directory, HF directory)."""
    return load_source(path, segment=segment, head_plan=head_plan).build().eval()


def load_for_eval(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  segment: SegmentConfig | None = None, head_plan: HeadPlan | None = None):
    """(reference model, tokenizer) of a checkpoint in any format; the tokenizer is read from
    ``tokenizer`` if given, else from the checkpoint (a pretraining checkpoint carries its
    sentencepiece model). Its BOS follows the checkpoint (`model_adds_bos`: none for a
    pretraining checkpoint). ``segment``/``head_plan`` replace the checkpoint's settings."""
    source = load_source(path, segment=segment, head_plan=head_plan)
    if tokenizer is None and not (Path(path) / BYTE_TOKENIZER_FILE).is_file() and source.tokenizer is not None:
        tokenizer = source.tokenizer
    return source.build().eval(), load_tokenizer(tokenizer or path, add_bos=model_adds_bos(source))


def is_reference_model(model) -> bool:
    """True for megaseg's reference model, or anything that runs like it (a ``ModelConfig``
    as ``config``, ``model(ids, states)``, ``model.model.layers[i].self_attn.core``)."""
    return isinstance(getattr(model, "config", None), ModelConfig)


def model_config(model) -> ModelConfig:
    """The megaseg ``ModelConfig`` of a reference model or of a megaseg HF export loaded with
    transformers (``megaseg_config``); CheckpointError for anything else."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):
        return cfg
    cfg = getattr(model, "megaseg_config", None)
    if isinstance(cfg, ModelConfig):
        return cfg
    raise CheckpointError(f"{type(model).__name__} is not a megaseg model; load it with "
                          "megaseg.eval.loading.load_for_eval(path) or reference_model(model)")


def reference_model(model, segment: SegmentConfig | None = None, head_plan: HeadPlan | None = None):
    """megaseg's reference model for ``model``: itself when it is one; a checkpoint path
    (any format, `load_weights`); or a transformers model in memory — a megaseg HF export
    (`MegasegLlamaForCausalLM`) keeps its settings, a plain Llama/Qwen2/Mistral gets full
    attention as `eval_settings` (or ``segment``/``head_plan``). The copy is on the CPU, in
    eval mode, with the same weights and dtype."""
    if is_reference_model(model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_weights(model, segment, head_plan)
    from megaseg.checkpoint.weights import build_model, check_weights

    name = type(model).__name__
    cfg = getattr(model, "megaseg_config", None)
    if not isinstance(cfg, ModelConfig):
        to_dict = getattr(getattr(model, "config", None), "to_dict", None)
        if to_dict is None:
            raise CheckpointError(f"{name} is not a model megaseg can evaluate (a megaseg model, a transformers "
                                  "Llama/Qwen2/Mistral model, or a checkpoint path)")
        from megaseg.hf_config import model_config_from_hf
        from megaseg.segment_options import full_attention, hf_max_context
        hf = to_dict()
        if segment is None:
            groups = int(hf.get("num_key_value_heads") or hf.get("num_attention_heads") or 1)
            segment, head_plan = full_attention(int(hf.get("num_hidden_layers") or 1), groups, hf_max_context(hf))
        cfg = model_config_from_hf(hf, segment, head_plan, source=name)
    elif segment is not None or head_plan is not None:
        cfg = cfg.replace(segment=segment or cfg.segment, head_plan=head_plan or cfg.head_plan)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), None)
    return build_model(cfg, check_weights(sd, cfg, name), dtype).eval()
