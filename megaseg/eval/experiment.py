"""The alignment experiment at small scale (one CPU thread).

Small Llama models are trained on the same data for the same steps, differing only in how
attention runs during training:

    full        one segment covers the sequence (S = T, M = R = 0): plain causal attention
    tbptt1      megaseg S, M, R, K = 1 with long-range (retrieval) heads
    tbptt0      the same with K = 0 (every tail detached)
    m0          K = 1 but M = 0 (no carried tail)
    no_lr       K = 1, no long-range layers (all heads `local`, R = 0)

Data: natural text (Python standard library sources, byte-level tokens) with recall cases
planted as in the evaluation tasks (passkey, magic-number needles with distractor keys),
so the answer of a query depends on a needle one or more segments back, and copy pieces
(a random string repeated at random places in natural text). All variants start from the
same weights: a short full-attention warm-up on repeated random strings, so that copy
heads exist before the variants diverge (see ``copy_warmup``).

Every model is then evaluated by ``megaseg.eval.evaluator`` under segmented inference (the
megaseg configuration of ``tbptt1``; each ablation under its own) and under full attention,
at the training length and 2x, 4x, 8x it: perplexity by position on held-out text and task
accuracy. The full-attention-trained model is also run in the StreamingLLM and
DuoAttention modes, and its heads are scored by calibrated head selection; the calibrated
plan is compared with the `prior`, `contiguous` and `interleaved` presets.

This module trains and evaluates (`run`); the settings and variants are in
``experiment_config.py`` (`ExperimentConfig`, re-exported here), the training data in
``experiment_data.py``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from megaseg.checkpoint.weights import save_model_dir
from megaseg.config import ConfigError, HeadPlan, ModelConfig, SegmentConfig
from megaseg.eval.evaluator import eval_documents, perplexity, task_accuracy
from megaseg.eval.experiment_config import VARIANTS, ExperimentConfig
from megaseg.eval.experiment_data import TRAIN_TASKS, copy_warmup_batch, corpora, training_batch
from megaseg.eval.head_selection import plan_record, score_heads, select_plan, write_plan
from megaseg.eval.loading import ByteTokenizer, load_for_eval
from megaseg.eval.modes import InferenceMode
from megaseg.eval.tasks import Haystack, generate
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.tbptt import tbptt_backward

__all__ = ["TRAIN_TASKS", "VARIANTS", "ExperimentConfig", "copy_warmup", "evaluate_modes", "run", "train_variant"]


# ---- training --------------------------------------------------------------------------------
def _train(model, mcfg: ModelConfig, steps: int, batch_fn, lr: float, warmup: int, name: str, log,
           decay: bool = True) -> list[float]:
    """AdamW, linear warmup then cosine to lr/10 (or constant), TBPTT-K with the model's own S and K."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        if step < warmup or not decay:
            rate = lr * min(1.0, (step + 1) / warmup)
        else:
            rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = rate
        opt.zero_grad(set_to_none=True)
        res = tbptt_backward(lambda ids, st: model(ids, st), batch_fn(step), mcfg.segment.segment_length,
                             mcfg.segment.tbptt_k)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(res.loss)
        if step % 50 == 0 or step == steps - 1:
            log(f"[{name}] step {step + 1}/{steps} loss {res.loss:.4f} ({time.perf_counter() - start:.0f} s)")
    return losses


def copy_warmup(cfg: ExperimentConfig, tokenizer, log: Callable[[str], None] = print) -> dict:
    """The shared initial weights: ``copy_warmup_steps`` steps of full attention on repeated
    random strings (copying within a few dozen tokens, inside any segment), so that every
    variant starts from the same copy-capable model."""
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config("full")
    model = SegmentedLlamaForCausalLM(mcfg).train()
    if cfg.copy_warmup_steps:
        start = time.perf_counter()
        losses = _train(model, mcfg, cfg.copy_warmup_steps, lambda s: copy_warmup_batch(cfg, s, tokenizer), cfg.warmup_lr,
                        cfg.warmup, "copy warm-up", log, decay=False)
        log(f"copy warm-up: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} in {time.perf_counter() - start:.0f} s")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_variant(cfg: ExperimentConfig, variant: str, tokenizer, haystack: Haystack, out_dir: Path,
                  log: Callable[[str], None] = print, init: dict | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(variant)
    model = SegmentedLlamaForCausalLM(mcfg).train()
    if init is not None:
        model.load_state_dict(init)
    start = time.perf_counter()
    losses = _train(model, mcfg, cfg.steps, lambda s: training_batch(cfg, s, tokenizer, haystack), cfg.lr, cfg.warmup,
                    variant, log)
    seconds = time.perf_counter() - start
    ckpt = out_dir / "checkpoints" / variant
    save_model_dir(ckpt, model.state_dict(), mcfg)
    tokenizer.save(ckpt)
    return {"variant": variant, "checkpoint": str(ckpt), "train_seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "loss_curve": [round(x, 4) for x in losses[:: max(1, cfg.steps // 50)]],
            "segment": asdict(mcfg.segment), "head_plan": mcfg.head_plan.to_list()}


# ---- evaluation ------------------------------------------------------------------------------
def evaluate_modes(model, tokenizer, modes: list[InferenceMode], cfg: ExperimentConfig, haystack: Haystack,
                   lengths: list[int], tasks: list[str], ppl_docs: int, progress=None) -> list[dict]:
    rows = []
    jobs = [(m, L) for m in modes for L in lengths]
    for mode, L in (progress(jobs) if progress else jobs):
        docs = eval_documents(haystack, L, ppl_docs, seed=cfg.seed)
        p = perplexity(model, mode, docs, bucket=cfg.segment_length)
        row = {"mode": mode.name, "length": L, "ppl": round(p.ppl, 4), "bucket_ppl": [round(x, 4) for x in p.bucket_ppl],
               "peak_state_mib": round(p.peak_state_mib, 4), "ppl_seconds": round(p.seconds, 2), "tasks": {}}
        peak, secs = p.peak_state_mib, 0.0
        for t in tasks:
            try:  # a task whose own text does not fit this length is left out of the row
                r = task_accuracy(model, mode, tokenizer, t, L, cfg.task_samples, haystack, seed=cfg.seed)
            except ConfigError as e:
                if "needs at least" not in str(e):
                    raise
                row["tasks"][t] = {"skipped": str(e)}
                continue
            row["tasks"][t] = {"accuracy": round(r.accuracy, 4), "exact": round(r.exact, 4),
                               "predictions": r.predictions}
            peak, secs = max(peak, r.peak_state_mib), secs + r.seconds
        row["task_peak_state_mib"] = round(peak, 4)
        row["task_seconds"] = round(secs, 2)
        row["recall_accuracy"] = round(_mean([row["tasks"][t]["accuracy"] for t in tasks
                                              if t in TRAIN_TASKS_EVAL and "accuracy" in row["tasks"][t]]), 4)
        rows.append(row)
    return rows


# Recall accuracy: the mean over the recall tasks that fit every evaluated length.
TRAIN_TASKS_EVAL = TRAIN_TASKS


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class _Run:
    """One run of the experiment: its settings, output directory, tokenizer and haystacks,
    the evaluated lengths, and the result so far (written to ``alignment.json``)."""

    cfg: ExperimentConfig
    out: Path
    tok: ByteTokenizer
    train_hay: Haystack
    held_hay: Haystack
    log: Callable[[str], None]
    progress: Callable | None
    result: dict

    @property
    def lengths(self) -> list[int]:
        return [self.cfg.train_length * k for k in self.cfg.length_multipliers]

    def evaluate(self, model, tokenizer, modes: list[InferenceMode], tasks: list[str]) -> list[dict]:
        return evaluate_modes(model, tokenizer, modes, self.cfg, self.held_hay, self.lengths, tasks,
                              self.cfg.ppl_documents, self.progress)

    def dump(self) -> None:
        _dump(self.out, self.result)


def run(cfg: ExperimentConfig, log: Callable[[str], None] = print, progress=None) -> dict:
    """Train every variant (or reuse this configuration's checkpoints in ``output_dir``),
    evaluate them, and write ``alignment.json`` there after every stage; returns its content."""
    torch.set_num_threads(cfg.threads)
    wall = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    train_hay, held_hay = corpora(cfg, tok)
    result: dict = {"config": asdict(cfg), "tokenizer": "bytes (UTF-8, vocab 258)", "training": {}, "alignment": {},
                    "baselines": [], "head_selection": {}}
    r = _Run(cfg, out, tok, train_hay, held_hay, log, progress, result)
    _train_variants(r)
    eval_start = time.perf_counter()
    _evaluate_alignment(r)
    base_variant = "full" if "full" in cfg.variants else cfg.variants[0]
    model, tok2 = load_for_eval(result["training"][base_variant]["checkpoint"])
    if cfg.head_selection:
        result["head_selection"] = _compare_head_plans(r, base_variant, model, tok2)
        r.dump()
    if cfg.baselines:
        _evaluate_baselines(r, base_variant)
    result["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
    result["train_seconds"] = round(result["copy_warmup_seconds"] + sum(t["train_seconds"] for t in result["training"].values()), 1)
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    r.dump()
    return result


def _train_variants(r: _Run) -> None:
    """The copy warm-up, then every variant from its weights; or, when this configuration was
    trained in ``output_dir`` already, its checkpoints."""
    cfg, result = r.cfg, r.result
    previous = _previous_training(r.out, cfg)
    if previous:  # the same configuration was trained here already: evaluate its checkpoints
        r.log(f"reusing the trained checkpoints in {r.out / 'checkpoints'}")
        result["training"], result["copy_warmup_seconds"] = previous
        return
    t0 = time.perf_counter()
    init = copy_warmup(cfg, r.tok, r.log)
    result["copy_warmup_seconds"] = round(time.perf_counter() - t0, 1)
    for v in cfg.variants:
        result["training"][v] = train_variant(cfg, v, r.tok, r.train_hay, r.out, r.log, init)
        r.dump()


def _evaluate_alignment(r: _Run) -> None:
    """Every variant under its segmented configuration and under full attention (tbptt1 also
    with retrieval switched off), at every length."""
    cfg = r.cfg
    full_mode = InferenceMode("full", "full", chunk=cfg.segment_length)
    for v in cfg.variants:
        model, tok2 = load_for_eval(r.result["training"][v]["checkpoint"])
        modes = [cfg.segmented_mode(v), full_mode]
        if v == "tbptt1":  # the same weights with retrieval switched off: do retrieval heads carry recall?
            modes.append(InferenceMode("segmented_no_retrieval", "megaseg", segment=cfg.segment("no_lr"),
                                       head_plan=HeadPlan.all_local(cfg.num_layers, cfg.num_heads)))
        r.log(f"evaluating {v}: {', '.join(m.name for m in modes)} at {r.lengths}")
        r.result["alignment"][v] = r.evaluate(model, tok2, modes, cfg.tasks)
        r.dump()


def _compare_head_plans(r: _Run, base_variant: str, model, tok2) -> dict:
    """Calibrated head selection on ``model`` (written to ``calibrated_plan.json``), and its
    plan against the `prior`, `contiguous` and `interleaved` presets, in megaseg and
    DuoAttention modes."""
    cfg = r.cfg
    budget = cfg.compare_long_heads * len(cfg.long_range_layers)
    cal = [generate(TRAIN_TASKS[i % len(TRAIN_TASKS)], cfg.train_length, 20_000_000 + i, r.tok, r.train_hay).ids
           for i in range(cfg.calibration_sequences)]
    t0 = time.perf_counter()
    scores = score_heads(model, cal, cfg.segment_length, "loss", tail=cfg.tail_length)
    calibrated = select_plan(scores, budget)
    record = plan_record(scores, calibrated, budget, "loss", cfg.segment_length, cfg.tail_length)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_plan(r.out / "calibrated_plan.json", record)
    L, G = cfg.num_layers, cfg.num_heads
    lr_layers = cfg.long_range_layers
    n = cfg.compare_long_heads
    plans = {
        "calibrated": calibrated,
        "prior": HeadPlan.prior(L, G, lr_layers, list(range(G - n, G))),
        "contiguous": HeadPlan.contiguous(L, G, lr_layers, n),
        "interleaved": HeadPlan.interleaved(L, G, lr_layers, n),
    }
    r.log(f"head selection on {base_variant}: ranking {record['ranking'][:budget]}; comparing {list(plans)}")
    seg = SegmentConfig(cfg.segment_length, cfg.tail_length, cfg.retrieval_length, 1)
    window = cfg.segment_length + cfg.tail_length
    modes = []
    for name, plan in plans.items():
        modes.append(InferenceMode(f"megaseg[{name}]", "megaseg", segment=seg, head_plan=plan))
        modes.append(InferenceMode(f"duo[{name}]", "duo", sinks=cfg.streaming_sinks, window=window,
                                   full_heads=plan, chunk=cfg.segment_length))
    return {"model": base_variant, "record": record, "plans": {k: p.to_list() for k, p in plans.items()},
            "rows": r.evaluate(model, tok2, modes, list(TRAIN_TASKS_EVAL))}


def _evaluate_baselines(r: _Run, base_variant: str) -> None:
    """StreamingLLM and DuoAttention on the base variant and tbptt1, next to their segmented
    and full rows."""
    # Same weights, same tasks and lengths: the segmented and full rows come from the
    # alignment runs above; StreamingLLM and DuoAttention are added here.
    cfg = r.cfg
    window = cfg.segment_length + cfg.tail_length
    plan = cfg.plan("tbptt1")
    modes = [InferenceMode("streaming", "streaming", sinks=cfg.streaming_sinks, window=window, chunk=cfg.segment_length),
             InferenceMode("duo", "duo", sinks=cfg.streaming_sinks, window=window, full_heads=plan,
                           chunk=cfg.segment_length)]
    for v in [x for x in dict.fromkeys((base_variant, "tbptt1")) if x in cfg.variants]:
        model, tok2 = load_for_eval(r.result["training"][v]["checkpoint"])
        r.log(f"baselines on {v}")
        rows = [dict(row) for row in r.result["alignment"][v] if row["mode"] in ("full", "segmented")]
        rows += r.evaluate(model, tok2, modes, cfg.tasks)
        for row in rows:
            row["model"] = v
            r.result["baselines"].append(row)
        r.dump()


def _previous_training(out: Path, cfg: ExperimentConfig):
    """(training records, warm-up seconds) of an earlier run of this exact configuration in
    ``out`` whose checkpoints all exist, else None."""
    path = out / "alignment.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    training = old.get("training") or {}
    if old.get("config") != asdict(cfg) or set(training) != set(cfg.variants):
        return None
    if not all((Path(t["checkpoint"]) / "megaseg_config.json").is_file() for t in training.values()):
        return None
    return training, old.get("copy_warmup_seconds", 0.0)


def _dump(out: Path, result: dict) -> None:
    (out / "alignment.json").write_text(json.dumps(result, indent=1) + "\n")
