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
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.data.corpus import stdlib_documents
from megaseg.eval.evaluator import eval_documents, perplexity, task_accuracy
from megaseg.eval.head_selection import plan_record, score_heads, select_plan, write_plan
from megaseg.eval.loading import ByteTokenizer, load_for_eval
from megaseg.eval.modes import InferenceMode
from megaseg.eval.tasks import TASKS, Haystack, check_task, generate
from megaseg.checkpoint.weights import save_model_dir
from megaseg.models.llama import SegmentedLlamaForCausalLM
from megaseg.training.tbptt import tbptt_backward

VARIANTS = ("full", "tbptt1", "tbptt0", "m0", "no_lr")
TRAIN_TASKS = ("passkey", "niah_single", "niah_multikey")


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/alignment"
    seed: int = 0
    threads: int = 1
    corpus_bytes: int = 6 * 1024 * 1024
    # model
    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 170
    num_heads: int = 4
    rope_theta: float = 10000.0
    # segmented execution of the megaseg variants
    train_length: int = 512
    segment_length: int = 128
    tail_length: int = 32
    retrieval_length: int = 128
    long_range_layers: list = field(default_factory=lambda: [1, 3])
    num_long_heads: int = 1
    # training
    variants: list = field(default_factory=lambda: list(VARIANTS))
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    warmup_lr: float = 3e-3  # constant rate of the copy warm-up
    warmup: int = 20
    pieces_per_sequence: int = 2  # pieces (recall samples, copy pieces) in one training sequence
    copy_span: int = 24  # tokens repeated by each copy piece (0: recall task samples only)
    copy_warmup_steps: int = 1000  # shared initial steps on repeated random strings (0: none)
    # evaluation
    length_multipliers: list = field(default_factory=lambda: [1, 2, 4, 8])
    tasks: list = field(default_factory=lambda: ["passkey", "niah_single", "niah_multikey", "niah_multivalue",
                                                 "variable_tracking", "cwe", "fwe"])
    task_samples: int = 6
    ppl_documents: int = 4
    streaming_sinks: int = 4
    calibration_sequences: int = 4
    compare_long_heads: int = 2  # long heads per long-range layer in the head-plan comparison
    baselines: bool = True
    head_selection: bool = True

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"variants={self.variants!r} is invalid: choose from {', '.join(VARIANTS)}")
        for t in self.tasks:
            check_task(t)
        for name in ("train_length", "segment_length", "steps", "batch_size", "task_samples", "ppl_documents"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: must be an integer >= 1")
        if self.train_length % self.pieces_per_sequence:
            raise ConfigError(f"pieces_per_sequence={self.pieces_per_sequence} must divide train_length={self.train_length}")
        if self.train_length <= self.segment_length:
            raise ConfigError(f"train_length={self.train_length} must exceed segment_length={self.segment_length} "
                              "(otherwise every variant trains with full attention)")

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"experiment: unknown keys {unknown}; allowed {sorted(known)}")
        return cls(**d)

    # ---- models ----------------------------------------------------------------------------
    def plan(self, variant: str) -> HeadPlan:
        G = self.num_heads
        if variant in ("full", "no_lr"):
            return HeadPlan.all_local(self.num_layers, G)
        return HeadPlan.interleaved(self.num_layers, G, self.long_range_layers, self.num_long_heads)

    def segment(self, variant: str) -> SegmentConfig:
        S, M, R = self.segment_length, self.tail_length, self.retrieval_length
        if variant == "full":
            return SegmentConfig(self.train_length, 0, 0, 1)
        if variant == "tbptt0":
            return SegmentConfig(S, M, R, 0)
        if variant == "m0":
            return SegmentConfig(S, 0, R, 1)
        if variant == "no_lr":
            return SegmentConfig(S, M, 0, 1)
        return SegmentConfig(S, M, R, 1)

    def model_config(self, variant: str) -> ModelConfig:
        return ModelConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_heads,
                           rope=RopeConfig(theta=self.rope_theta), segment=self.segment(variant),
                           head_plan=self.plan(variant))

    def segmented_mode(self, variant: str) -> InferenceMode:
        """Segmented inference: the full-attention model runs tbptt1's configuration."""
        v = "tbptt1" if variant == "full" else variant
        return InferenceMode("segmented", "megaseg", segment=self.segment(v), head_plan=self.plan(v))


# ---- data ------------------------------------------------------------------------------------
def corpora(cfg: ExperimentConfig, tokenizer) -> tuple[Haystack, Haystack]:
    """(train, held-out) haystacks: every tenth stdlib document is held out."""
    docs = list(stdlib_documents(max_bytes=cfg.corpus_bytes))
    train = [d.text for i, d in enumerate(docs) if i % 10]
    held = [d.text for i, d in enumerate(docs) if i % 10 == 0]
    return Haystack(train, tokenizer, "stdlib-train"), Haystack(held, tokenizer, "stdlib-heldout")


def copy_piece(length: int, seed: int, tokenizer, haystack: Haystack, span: int, repeats: int = 4) -> list[int]:
    """Natural text with a random alphanumeric string of ``span`` characters inserted
    ``repeats`` times at random places: every repeat is predictable only by looking back
    (an in-context copy case; it makes copy heads form within a few hundred steps)."""
    rng = random.Random(f"copy:{length}:{seed}")
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(span))
    code = tokenizer.encode(" " + text + " ", add_bos=False)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    body = [t for c in haystack.chunks(length - len(bos) - repeats * len(code), rng) for t in c]
    cuts = sorted(rng.randrange(0, len(body) + 1) for _ in range(repeats))
    out, prev = list(bos), 0
    for c in cuts:
        out += body[prev:c] + code
        prev = c
    return out + body[prev:]


def copy_warmup_batch(cfg: ExperimentConfig, step: int, tokenizer) -> torch.Tensor:
    """Rows made of one random alphanumeric string repeated to the row length (the copy
    warm-up data: a small model on the natural-text mixture alone formed no copy heads
    within 800 steps)."""
    return torch.tensor([copy_warmup_row(cfg.train_length, f"warmup:{cfg.seed}:{step}:{b}", tokenizer)
                         for b in range(cfg.batch_size)], dtype=torch.long)


def copy_warmup_row(length: int, seed: str, tokenizer) -> list[int]:
    rng = random.Random(seed)
    span = rng.randrange(16, 49)
    unit = tokenizer.encode(" " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(span)),
                            add_bos=False)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    return (bos + unit * (length // len(unit) + 1))[:length]


def training_batch(cfg: ExperimentConfig, step: int, tokenizer, haystack: Haystack) -> torch.Tensor:
    """[batch, train_length]: each row concatenates pieces of train_length / pieces tokens;
    of every four pieces two are recall task samples (needle, natural text, query, answer),
    one a copy piece, one a repeated random string as in the warm-up (without these the
    warm-up's copy ability was gone after 600 steps of the rest). Seeds are disjoint from
    evaluation's."""
    piece = cfg.train_length // cfg.pieces_per_sequence
    rows = []
    for b in range(cfg.batch_size):
        row = []
        for p in range(cfg.pieces_per_sequence):
            k = (step * cfg.batch_size + b) * cfg.pieces_per_sequence + p
            seed = 10_000_000 + cfg.seed * 1_000_003 + k
            kind = (p + b) % 4
            if cfg.copy_span and kind == 1:
                row += copy_piece(piece, seed, tokenizer, haystack, cfg.copy_span)
            elif cfg.copy_warmup_steps and kind == 3:  # keeps the warm-up's copy heads alive
                row += copy_warmup_row(piece, f"mix:{cfg.seed}:{k}", tokenizer)
            else:
                row += generate(TRAIN_TASKS[(k // 2) % len(TRAIN_TASKS)], piece, seed, tokenizer, haystack).ids
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


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


def run(cfg: ExperimentConfig, log: Callable[[str], None] = print, progress=None) -> dict:
    torch.set_num_threads(cfg.threads)
    wall = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    train_hay, held_hay = corpora(cfg, tok)
    result: dict = {"config": asdict(cfg), "tokenizer": "bytes (UTF-8, vocab 258)", "training": {}, "alignment": {},
                    "baselines": [], "head_selection": {}}
    previous = _previous_training(out, cfg)
    if previous:  # the same configuration was trained here already: evaluate its checkpoints
        log(f"reusing the trained checkpoints in {out / 'checkpoints'}")
        result["training"], result["copy_warmup_seconds"] = previous
    else:
        t0 = time.perf_counter()
        init = copy_warmup(cfg, tok, log)
        result["copy_warmup_seconds"] = round(time.perf_counter() - t0, 1)
        for v in cfg.variants:
            result["training"][v] = train_variant(cfg, v, tok, train_hay, out, log, init)
            _dump(out, result)
    eval_start = time.perf_counter()
    lengths = [cfg.train_length * k for k in cfg.length_multipliers]
    full_mode = InferenceMode("full", "full", chunk=cfg.segment_length)
    for v in cfg.variants:
        model, tok2 = load_for_eval(result["training"][v]["checkpoint"])
        modes = [cfg.segmented_mode(v), full_mode]
        if v == "tbptt1":  # the same weights with retrieval switched off: do retrieval heads carry recall?
            modes.append(InferenceMode("segmented_no_retrieval", "megaseg", segment=cfg.segment("no_lr"),
                                       head_plan=HeadPlan.all_local(cfg.num_layers, cfg.num_heads)))
        log(f"evaluating {v}: {', '.join(m.name for m in modes)} at {lengths}")
        result["alignment"][v] = evaluate_modes(model, tok2, modes, cfg, held_hay, lengths, cfg.tasks,
                                                cfg.ppl_documents, progress)
        _dump(out, result)
    base_variant = "full" if "full" in cfg.variants else cfg.variants[0]
    model, tok2 = load_for_eval(result["training"][base_variant]["checkpoint"])
    budget = cfg.compare_long_heads * len(cfg.long_range_layers)
    if cfg.head_selection:
        cal = [generate(TRAIN_TASKS[i % len(TRAIN_TASKS)], cfg.train_length, 20_000_000 + i, tok, train_hay).ids
               for i in range(cfg.calibration_sequences)]
        t0 = time.perf_counter()
        scores = score_heads(model, cal, cfg.segment_length, "loss", tail=cfg.tail_length)
        calibrated = select_plan(scores, budget)
        record = plan_record(scores, calibrated, budget, "loss", cfg.segment_length, cfg.tail_length)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        write_plan(out / "calibrated_plan.json", record)
        L, G = cfg.num_layers, cfg.num_heads
        lr_layers = cfg.long_range_layers
        n = cfg.compare_long_heads
        plans = {
            "calibrated": calibrated,
            "prior": HeadPlan.prior(L, G, lr_layers, list(range(G - n, G))),
            "contiguous": HeadPlan.contiguous(L, G, lr_layers, n),
            "interleaved": HeadPlan.interleaved(L, G, lr_layers, n),
        }
        log(f"head selection on {base_variant}: ranking {record['ranking'][:budget]}; comparing {list(plans)}")
        seg = SegmentConfig(cfg.segment_length, cfg.tail_length, cfg.retrieval_length, 1)
        window = cfg.segment_length + cfg.tail_length
        modes = []
        for name, plan in plans.items():
            modes.append(InferenceMode(f"megaseg[{name}]", "megaseg", segment=seg, head_plan=plan))
            modes.append(InferenceMode(f"duo[{name}]", "duo", sinks=cfg.streaming_sinks, window=window,
                                       full_heads=plan, chunk=cfg.segment_length))
        result["head_selection"] = {"model": base_variant, "record": record,
                                    "plans": {k: p.to_list() for k, p in plans.items()},
                                    "rows": evaluate_modes(model, tok2, modes, cfg, held_hay, lengths,
                                                           list(TRAIN_TASKS_EVAL), cfg.ppl_documents, progress)}
        _dump(out, result)
    if cfg.baselines:
        # Same weights, same tasks and lengths: the segmented and full rows come from the
        # alignment runs above; StreamingLLM and DuoAttention are added here.
        window = cfg.segment_length + cfg.tail_length
        plan = cfg.plan("tbptt1")
        modes = [InferenceMode("streaming", "streaming", sinks=cfg.streaming_sinks, window=window, chunk=cfg.segment_length),
                 InferenceMode("duo", "duo", sinks=cfg.streaming_sinks, window=window, full_heads=plan,
                               chunk=cfg.segment_length)]
        for v in [x for x in dict.fromkeys((base_variant, "tbptt1")) if x in cfg.variants]:
            model, tok2 = load_for_eval(result["training"][v]["checkpoint"])
            log(f"baselines on {v}")
            rows = [dict(r) for r in result["alignment"][v] if r["mode"] in ("full", "segmented")]
            rows += evaluate_modes(model, tok2, modes, cfg, held_hay, lengths, cfg.tasks, cfg.ppl_documents, progress)
            for r in rows:
                r["model"] = v
                result["baselines"].append(r)
            _dump(out, result)
    result["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
    result["train_seconds"] = round(result["copy_warmup_seconds"] + sum(t["train_seconds"] for t in result["training"].values()), 1)
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    _dump(out, result)
    return result


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
