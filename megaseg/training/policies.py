"""The decisions the training loop takes at every step boundary, each a small object:
when and how to save (`Checkpointer`), when to validate (`Validator`), when to stop early
(`ExitPolicy`: signals, duration, interval), and how many non-finite steps to tolerate
(`SkipPolicy`). Each decision that more than one rank acts on is agreed on all ranks.
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from megaseg.checkpoint.training import save_training_checkpoint
from megaseg.training.batches import compute_device

INTERRUPTED_FILE = "interrupted.txt"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([int(flag)], dtype=torch.int32, device=compute_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


class Checkpointer:
    """Saves ``cfg.save`` checkpoints every ``save_interval`` steps and at the end; keeps the
    last ``keep_last_n`` (never the one resumed from); with ``overwrite_checkpoints`` the
    first save of a fresh run removes the checkpoints that were there before. With
    ``async_save`` the files are written in the background: `poll` (every step boundary,
    collective) commits a finished save, a new save first waits for the one in flight, and
    `close` waits for the last; pruning and overwriting happen when a save is committed."""

    def __init__(self, cfg, model, optimizer, scheduler, *, model_config: dict, hf_fields, resume_from, say):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.model_config, self.hf_fields, self.resume_from, self.say = model_config, hf_fields, resume_from, say
        self.last_checkpoint: str | None = None
        self.saved_at: int | None = None  # iteration of the newest checkpoint of this run (or resumed)
        self._replaced = False
        self._queue = None
        self._started = 0.0
        if cfg.async_save and cfg.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def due(self, iteration: int) -> bool:
        return bool(self.cfg.save and self.cfg.save_interval and iteration % self.cfg.save_interval == 0)

    def save(self, iteration: int, consumed: int) -> None:
        cfg = self.cfg
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)  # one save in flight at a time
        self._started = time.perf_counter()
        path = save_training_checkpoint(
            cfg.save, iteration, self.model, self.optimizer, self.scheduler,
            consumed_train_samples=consumed, args=cfg.to_dict(), model_config=self.model_config,
            tokenizer_model=cfg.tokenizer_model, hf=self.hf_fields, async_queue=self._queue,
            on_commit=self._committed,
        )
        self.saved_at = iteration
        if self._queue is not None:
            self.say(f"saving checkpoint {path} in the background ({time.perf_counter() - self._started:.1f} s "
                     "to start)")

    def poll(self) -> None:
        """Commit an asynchronous save whose files every rank has written (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def close(self) -> None:
        """Wait for the save in flight and commit it (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)
            self._queue.close()
            self._queue = None

    def _committed(self, path: str) -> None:
        from megaseg.training.ownership import prune_checkpoints, remove_other_checkpoints

        cfg = self.cfg
        self.last_checkpoint = path
        self.say(f"saved checkpoint {path} ({time.perf_counter() - self._started:.1f} s)")
        if cfg.keep_last_n:
            if _is_rank0():
                prune_checkpoints(cfg.save, cfg.keep_last_n, protect=self.resume_from)
            _barrier()
        if cfg.overwrite_checkpoints and self.resume_from is None and not self._replaced:
            self._replaced = True
            if _is_rank0():
                removed = remove_other_checkpoints(cfg.save, self.last_checkpoint)
                if removed:
                    self.say(f"--overwrite-checkpoints: removed the earlier checkpoints {', '.join(removed)}")
            _barrier()

    def mark_interrupted(self, reason: str | None) -> None:
        """<save>/interrupted.txt names why a run stopped early (a job script requeues on it);
        removed when the run reaches train_iters."""
        save = self.cfg.save
        if not save or not _is_rank0():
            return
        path = os.path.join(save, INTERRUPTED_FILE)
        if reason is None:
            if os.path.exists(path):
                os.remove(path)
            return
        os.makedirs(save, exist_ok=True)
        with open(path, "w") as fh:
            fh.write(reason + "\n")


class Validator:
    """Validation every ``eval_interval`` steps and at the last one (with a dataset and
    ``eval_iters`` > 0)."""

    def __init__(self, cfg, engine, dataset, monitor):
        self.cfg, self.engine, self.dataset, self.monitor = cfg, engine, dataset, monitor
        self.enabled = dataset is not None and cfg.eval_iters > 0
        self.losses: list[tuple[int, float]] = []

    def due(self, iteration: int) -> bool:
        return self.enabled and (iteration % self.cfg.eval_interval == 0 or iteration == self.cfg.train_iters)

    def run(self, iteration: int) -> None:
        t = time.perf_counter()
        result = self.engine.evaluate(self.dataset)
        self.losses.append((iteration, result.loss))
        self.monitor.record_validation(iteration, result.loss, result.segment_losses, time.perf_counter() - t)


class ExitSignals:
    """SIGTERM/SIGUSR1 set a flag; the loop saves and exits at the next step boundary.

    `received()` is collective: every rank learns that any rank was signalled, so all save
    the same iteration. Previous handlers are restored by `close()`.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._previous = {}
        if not enabled:
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                break

    def _handle(self, signum, frame):
        self.signum = signum

    def received(self) -> int | None:
        value = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([value], dtype=torch.int64, device=compute_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            value = int(t.item())
        return value or None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class ExitPolicy:
    """Why the run stops before train_iters, if it does: a signal on any rank, the wall-time
    budget (``exit_duration_in_mins``, the slowest rank's clock), or ``exit_interval``."""

    def __init__(self, cfg, t_start: float):
        self.cfg, self.t_start = cfg, t_start
        self.signals = ExitSignals(cfg.exit_signal_handler)

    def reason(self, iteration: int) -> str | None:
        cfg = self.cfg
        signum = self.signals.received()
        if signum is not None:
            return f"signal {signal.Signals(signum).name} at iteration {iteration}"
        if cfg.exit_duration_in_mins is not None and _any_rank(
                time.perf_counter() - self.t_start > 60 * cfg.exit_duration_in_mins):
            return f"exit_duration_in_mins={cfg.exit_duration_in_mins} reached at iteration {iteration}"
        if cfg.exit_interval and iteration % cfg.exit_interval == 0 and iteration < cfg.train_iters:
            return f"exit_interval={cfg.exit_interval} at iteration {iteration}"
        return None

    def close(self) -> None:
        self.signals.close()


class SkipPolicy:
    """Counts steps without an update (non-finite loss or gradient); more than
    ``max_consecutive_skipped_steps`` in a row stop the run with FloatingPointError."""

    def __init__(self, cfg, say):
        self.cfg, self.say = cfg, say
        self.skipped = 0
        self.in_a_row = 0

    def record(self, iteration: int, metrics, saved_at: int | None) -> None:
        if metrics.update_successful:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        self.say(f"iteration {iteration}: non-finite loss ({metrics.loss}) or gradient; step skipped "
                 f"({self.in_a_row} in a row, {self.skipped} in this run)")
        limit = self.cfg.max_consecutive_skipped_steps
        if self.in_a_row > limit:
            where = f"; the last good checkpoint is {self.cfg.save} (iteration {saved_at})" if saved_at else ""
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (iteration {iteration}, "
                f"max_consecutive_skipped_steps={limit}); lower --lr{where}")
