"""Every checkpoint format megaseg reads and writes, in one package.

    training.py        pretraining checkpoints: megatron-core dist_checkpointing, written
                       atomically with a manifest (model, optimizer, scheduler, RNG, data
                       position, the run's whole config and its tokenizer); weights readable
                       offline at any layout. Saving is here; the rest, re-exported, is in
    training_files.py  its file names, the manifest check, finding a checkpoint
    training_state.py  its sharded state dict and RNG states
    training_load.py   loading one into a run, reading one without a run
    weights.py         megaseg model directories (reference weights + megaseg_config.json, or
                       megatron shards per TP/PP rank) and Hugging Face Llama weight files
    formats.py         which format a path holds, and one loader for all of them
    inspect.py         a JSON-ready description of any checkpoint

One error type, `CheckpointError`, for all of them: a one-line message naming the file.
"""
from megaseg.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
