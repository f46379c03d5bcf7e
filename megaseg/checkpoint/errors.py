"""The one error type of every checkpoint format megaseg reads or writes.

Defined in `megaseg.errors`, below every package, so that `megaseg.hf_config` (config.json
of HF directories) raises it too.
"""
from megaseg.errors import CheckpointError

__all__ = ["CheckpointError"]
