"""Describe a checkpoint without building a model or loading its tensors.

    python tools/inspect_checkpoint.py runs/default/checkpoints          # the latest iteration
    python tools/inspect_checkpoint.py runs/default/checkpoints/iter_0000050 --json
    python tools/inspect_checkpoint.py HF_EXPORT_OR_MODEL_DIR [--no-verify]

Prints iteration, consumed samples, parallel layout, model and segment settings, the head
plan as a table (layers x KV groups), parameter count and tensor shapes, and whether every
file matches the checkpoint's manifest. Exit status 1 when the integrity check fails, 2 when
the path is not a checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseg.checkpoint.errors import CheckpointError  # noqa: E402
from megaseg.checkpoint.inspect import format_report, inspect_checkpoint  # noqa: E402
from megaseg.config import ConfigError  # noqa: E402
from megaseg.segment_options import OneLineArgumentParser  # noqa: E402


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining save/iter_* directory, megaseg model directory or HF directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--no-verify", action="store_true", help="skip the integrity check (it hashes every file)")
    args = p.parse_args(argv)
    try:
        info = inspect_checkpoint(args.checkpoint, verify=not args.no_verify)
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
    return 1 if info["integrity"].startswith("FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
