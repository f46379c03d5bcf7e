"""Recompute that keeps TBPTT-K exact: a non-reentrant checkpoint and the flag that tells
code it is running inside a recompute.

`checkpoint(fn, *args)` builds the ordinary autograd graph of ``fn`` — including tensors
``fn`` hands out by side effect, such as a segmented attention layer's carried KV tail — but
keeps only ``args`` for the backward, which re-runs ``fn`` to refill the activations it
needs. The re-run must not repeat the forward's side effects: `recomputing()` is true inside
it, and every reader of a side effect checks it (the state carrier, the statistics recorder,
the context-parallel messages, which replay what the forward received).
"""
from __future__ import annotations

from torch.utils.checkpoint import checkpoint as _torch_checkpoint

_depth = 0


def recomputing() -> bool:
    """Whether the code running is a recompute of a checkpointed function (in a backward)."""
    return _depth > 0


def checkpoint(fn, *args):
    """``fn(*args)``, keeping only ``args`` for the backward, which re-runs ``fn`` with
    `recomputing()` true."""
    ran = [False]

    def run(*inputs):
        global _depth
        if not ran[0]:
            ran[0] = True
            return fn(*inputs)
        _depth += 1
        try:
            return fn(*inputs)
        finally:
            _depth -= 1

    return _torch_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)
