"""Run an evaluation from a YAML file; write JSON results and PNG plots.

    python tools/evaluate.py examples/eval/checkpoint.yaml     # modes x tasks x lengths of checkpoints
    python tools/evaluate.py CONFIG.yaml --replot              # plots again from the written JSON

It evaluates checkpoints and trains nothing: training, the alignment experiment's arms
included, runs through pretrain/pretrain_gpt.py (the recipe: examples/recall/run.sh), and a
file with a top-level ``experiment:`` key stops with one line saying so. The file:

    checkpoints: {name: path}         # any checkpoint: pretraining save/iter_* directory, megaseg
                                      # model directory, megaseg HF export, plain HF Llama/Qwen2/Mistral
    tokenizer: null                   # optional tokenizer path for all checkpoints
    corpus: stdlib                    # haystack text: stdlib or a directory / file
    lengths: [1024, 4096]
    tasks: [passkey, niah_single]
    samples: 8                        # per task and length
    perplexity: {documents: 4, bucket: 512}
    modes:                            # see megaseg.eval.modes.InferenceMode
      - {name: megaseg, kind: megaseg}
      - {name: no_retrieval, kind: no_retrieval}   # retrieval groups -> local, R = 0 (same S, M)
      - {name: full, kind: full}
      - {name: streaming, kind: streaming, sinks: 4, window: 1024}
      - {name: duo, kind: duo, full_heads: plan.json, window: 1024}
    output: runs/eval

Every checkpoint loads through ``megaseg.eval.loading.load_for_eval`` and runs as megaseg's
reference model; a plain HF directory has no segment settings and runs as one segment of
its max context (full attention) unless a mode gives ``segment``/``head_plan``.

Bad input (unknown task, a length a mode or task cannot run, an empty or too-small corpus,
a checkpoint without a tokenizer, an ``experiment:`` key) stops with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from megaseg.config import ConfigError  # noqa: E402
from megaseg.checkpoint.errors import CheckpointError  # noqa: E402


def progress_bar(desc: str):
    """tqdm over a job list when tqdm is installed, else one log line per job."""
    try:
        from tqdm import tqdm
    except ImportError:
        def plain(items):
            items = list(items)
            for i, it in enumerate(items):
                print(f"{desc}: {i + 1}/{len(items)}", file=sys.stderr, flush=True)
                yield it
        return plain
    return lambda items: tqdm(list(items), desc=desc, file=sys.stderr, mininterval=5)


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config {path!r} is invalid: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path!r} is invalid: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} is invalid: expected a mapping at the top level")
    return data


EXPERIMENT_REMOVED = ("`experiment:` (training inside this tool) was removed; training experiments run through "
                      "pretrain/pretrain_gpt.py, the alignment experiment is examples/recall/run.sh")


def run_checkpoints(cfg: dict, output: Path, replot: bool) -> dict:
    from megaseg.eval.evaluator import eval_documents, perplexity, task_accuracy
    from megaseg.eval.loading import load_for_eval
    from megaseg.eval.modes import mode_from_dict
    from megaseg.eval.tasks import Haystack, check_task, generate

    if replot:
        return json.loads((output / "results.json").read_text())
    allowed = {"checkpoints", "tokenizer", "corpus", "lengths", "tasks", "samples", "perplexity", "modes", "output",
               "seed", "threads"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"config: unknown keys {unknown}; allowed {sorted(allowed)}")
    ckpts = cfg.get("checkpoints") or {}
    if not isinstance(ckpts, dict) or not ckpts:
        raise ConfigError("checkpoints is invalid: give a mapping {name: path}")
    tasks = [check_task(t) for t in cfg.get("tasks", [])]
    lengths = cfg.get("lengths") or []
    if not lengths or any(not isinstance(x, int) or x < 2 for x in lengths):
        raise ConfigError(f"lengths={lengths!r} is invalid: a list of integers >= 2")
    ppl_cfg = cfg.get("perplexity") or {}
    samples, seed = int(cfg.get("samples", 8)), int(cfg.get("seed", 0))
    torch.set_num_threads(int(cfg.get("threads", torch.get_num_threads())))
    result = {"config": cfg, "rows": []}
    for name, path in ckpts.items():
        model, tok = load_for_eval(path, cfg.get("tokenizer"))
        hay = Haystack.from_source(tok, cfg.get("corpus"))
        modes = [mode_from_dict(m) for m in cfg.get("modes") or [{"name": "megaseg", "kind": "megaseg"}]]
        for L in lengths:  # fail on a length a mode, task or corpus cannot serve before any work
            for m in modes:
                m.check_length(L)
            for t in tasks:
                generate(t, L, seed, tok, hay)
            if ppl_cfg.get("documents", 0):
                eval_documents(hay, L, 1, seed)
        bucket = int(ppl_cfg.get("bucket", model.config.segment.segment_length))
        jobs = [(m, L) for m in modes for L in lengths]
        for m, L in progress_bar(f"evaluating {name}")(jobs):
            row = {"model": name, "mode": m.name, "length": L, "tasks": {}}
            if ppl_cfg.get("documents", 0):
                p = perplexity(model, m, eval_documents(hay, L, int(ppl_cfg["documents"]), seed), bucket)
                row.update(ppl=p.ppl, bucket_ppl=p.bucket_ppl, peak_state_mib=p.peak_state_mib, ppl_seconds=p.seconds)
            else:
                row.update(ppl=float("nan"), bucket_ppl=[], peak_state_mib=0.0)
            peak = row["peak_state_mib"]
            for t in tasks:
                r = task_accuracy(model, m, tok, t, L, samples, hay, seed)
                row["tasks"][t] = {"accuracy": r.accuracy, "exact": r.exact, "seconds": r.seconds,
                                   "predictions": r.predictions}
                peak = max(peak, r.peak_state_mib)
            row["task_peak_state_mib"] = peak
            row["accuracy"] = sum(v["accuracy"] for v in row["tasks"].values()) / max(len(tasks), 1)
            result["rows"].append(row)
            output.mkdir(parents=True, exist_ok=True)
            (output / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML file")
    ap.add_argument("--output", help="output directory (default: the file's `output`, else runs/eval)")
    ap.add_argument("--replot", action="store_true", help="only redraw plots from the JSON already written")
    args = ap.parse_args(argv)
    try:
        cfg = _read_yaml(args.config)
        if "experiment" in cfg:
            raise ConfigError(f"config {args.config!r} is invalid: {EXPERIMENT_REMOVED}")
        output = Path(args.output or cfg.get("output") or "runs/eval")
        result = run_checkpoints(cfg, output, args.replot)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megaseg.eval import report

    if not report.plots_available():
        print("plots skipped: matplotlib is not installed (pip install -e '.[eval]')", file=sys.stderr)
    else:
        p = report.plot_modes(result["rows"], output / "results.png", "task accuracy vs context length", with_model=True)
        print(f"wrote {p}")
    print(f"wrote {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
