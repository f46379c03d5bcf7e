"""Every checkpoint format megaseg reads and writes, in one package.

    training.py  pretraining checkpoints: megatron-core dist_checkpointing, written atomically
                 with a manifest (model, optimizer, scheduler, RNG, data position, the run's
                 whole config and its tokenizer); weights readable offline at any layout
    weights.py   megaseg model directories (reference weights + megaseg_config.json, or
                 megatron shards per TP/PP rank) and Hugging Face Llama weight files
    formats.py   which format a path holds, and one loader for all of them

One error type, `CheckpointError`, for all of them: a one-line message naming the file.
"""
from megaseg.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
