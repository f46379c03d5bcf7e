"""Training monitoring: TensorBoard scalars every step, a log line every N steps.

TensorBoard tags (step = iteration):

    loss/train             mean NLL of the step's global batch
    loss/segment_<i>       mean NLL of segment i's tokens (does quality hold in later segments?)
    loss/valid             validation mean NLL;  loss/valid_segment_<i> per segment
    lr                     learning rate after the step's scheduler update
    grad_norm              global grad norm before clipping
    throughput/tokens_per_s
    memory/peak_mib        peak allocated CUDA memory, or peak resident set size on CPU

Only the rank that logs (rank 0) writes events and prints.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field

import torch


def peak_memory_mib() -> float:
    """Peak CUDA memory allocated by this process, or its peak RSS on CPU, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    segment_sums: list[float] = field(default_factory=list)
    segment_counts: list[int] = field(default_factory=list)

    def add(self, loss, segment_losses, tokens, seconds):
        self.steps += 1
        self.loss_sum += loss
        self.tokens += tokens
        self.seconds += seconds
        for i, value in enumerate(segment_losses):
            if i == len(self.segment_sums):
                self.segment_sums.append(0.0)
                self.segment_counts.append(0)
            self.segment_sums[i] += value
            self.segment_counts[i] += 1


# TensorBoard's "Custom Scalars" tab: every segment's loss in one chart (does quality hold in
# later segments?), and the segment statistics grouped by kind.
CUSTOM_SCALARS = {
    "loss by segment": {
        "training loss, one line per segment": ["Multiline", [r"loss/segment_\d+"]],
        "validation loss, one line per segment": ["Multiline", [r"loss/valid_segment_\d+"]],
    },
    "segments": {
        "retrieval distance (segments back)": ["Multiline", [r"segments/retrieval_distance/.*"]],
        "retrieved from the previous segment (share)": ["Multiline", [r"segments/retrieval_previous_segment_share/.*"]],
        "retrieval score margin, R-th vs (R+1)-th": ["Multiline", [r"segments/retrieval_margin/.*"]],
        "attention mass on the prefix": ["Multiline", [r"segments/prefix_mass/.*"]],
        "tail cotangent / grad norm, per depth": ["Multiline", [r"segments/tail_cotangent_rel_grad/.*"]],
    },
}


class TrainingMonitor:
    """Collects per-step metrics; writes TensorBoard scalars and periodic log lines.

    tensorboard_dir: None disables event files. log_interval: steps between log lines.
    train_iters: the final iteration (for the ETA). enabled: False on ranks that stay quiet.
    """

    def __init__(self, tensorboard_dir: str | None, log_interval: int, train_iters: int, enabled: bool = True,
                 out=None):
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.enabled = enabled
        self.out = out or sys.stdout
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
            self.writer.add_custom_scalars(CUSTOM_SCALARS)
        self._window = _Window()
        self._recent_step_s: list[float] = []

    # ------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.out, flush=True)

    def record_step(
        self,
        iteration: int,
        loss: float,
        segment_losses: list[float],
        lr: float,
        grad_norm: float | None,
        tokens: int,
        seconds: float,
        consumed_samples: int,
        skipped_steps: int = 0,
    ) -> None:
        """One optimizer step finished: write its scalars; print a line every log_interval.

        ``skipped_steps`` counts this run's steps without an update (non-finite loss or grad).
        """
        if not self.enabled:
            return
        tokens_per_s = tokens / seconds if seconds > 0 else float("nan")
        peak = peak_memory_mib()
        if self.writer is not None:
            w = self.writer
            w.add_scalar("loss/train", loss, iteration)
            for i, value in enumerate(segment_losses):
                w.add_scalar(f"loss/segment_{i}", value, iteration)
            w.add_scalar("lr", lr, iteration)
            if grad_norm is not None:
                w.add_scalar("grad_norm", grad_norm, iteration)
            w.add_scalar("throughput/tokens_per_s", tokens_per_s, iteration)
            w.add_scalar("memory/peak_mib", peak, iteration)
            w.add_scalar("skipped_steps", skipped_steps, iteration)
        self._window.add(loss, segment_losses, tokens, seconds)
        self._recent_step_s = (self._recent_step_s + [seconds])[-20:]
        if iteration % self.log_interval == 0 or iteration == self.train_iters:
            self._print_line(iteration, lr, grad_norm, consumed_samples, peak)

    def _print_line(self, iteration, lr, grad_norm, consumed_samples, peak):
        win = self._window
        self._window = _Window()
        avg_loss = win.loss_sum / max(win.steps, 1)
        seg = " ".join(f"{s / c:.3f}" for s, c in zip(win.segment_sums, win.segment_counts))
        # ETA from the median recent step time: robust to the slow first step and to
        # steps that include a checkpoint save or a validation pass.
        recent = sorted(self._recent_step_s)
        step_s = recent[len(recent) // 2] if recent else float("nan")
        eta = format_duration((self.train_iters - iteration) * step_s)
        width = len(str(self.train_iters))
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        self.log(
            f"iteration {iteration:>{width}}/{self.train_iters} | consumed samples {consumed_samples} | "
            f"loss {avg_loss:.4f} | segment losses {seg} | lr {lr:.3e} | grad norm {gn} | "
            f"{win.tokens / win.seconds if win.seconds else float('nan'):,.0f} tokens/s | "
            f"{1000 * win.seconds / max(win.steps, 1):,.0f} ms/iter | peak mem {peak:,.0f} MiB | ETA {eta}"
        )

    def record_segment_stats(self, iteration: int, scalars: dict[str, float], histograms: dict) -> None:
        """Scalars and histograms of `megaseg.ops.stats` (names under ``segments/``)."""
        if not self.enabled or self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, iteration)
        for name, values in histograms.items():
            if len(values):
                self.writer.add_histogram(name, values, iteration)

    def record_validation(self, iteration: int, loss: float, segment_losses: list[float], seconds: float) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_scalar("loss/valid", loss, iteration)
            for i, value in enumerate(segment_losses):
                self.writer.add_scalar(f"loss/valid_segment_{i}", value, iteration)
        seg = " ".join(f"{v:.3f}" for v in segment_losses)
        ppl = math.exp(min(loss, 50.0))
        self.log(f"validation at iteration {iteration} | loss {loss:.4f} | ppl {ppl:.2f} | "
                 f"segment losses {seg} | {seconds:.1f} s")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StepTimer:
    """Wall time of one step (synchronizing CUDA so asynchronous kernels are counted)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        return False
