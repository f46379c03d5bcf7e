"""TensorBoard scalars and the periodic log line."""
import io
import re

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megaseg.training.monitor import TrainingMonitor, format_duration
from megaseg.training.trainer import pretrain
from tests.training.synthetic import PatternDataset, tiny_config


def test_training_writes_tensorboard_scalars_and_log_lines(model_parallel, tmp_path):
    cfg = tiny_config(tmp_path, train_iters=4, log_interval=2, eval_interval=2)
    log = io.StringIO()
    pretrain(cfg, cfg.model_config(cfg.vocab_size), PatternDataset(32, 32), PatternDataset(4, 32, seed=1), out=log)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/train", "lr", "grad_norm", "throughput/tokens_per_s", "memory/peak_mib", "loss/valid"}
    expected |= {f"loss/segment_{i}" for i in range(4)} | {f"loss/valid_segment_{i}" for i in range(4)}
    assert expected <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("loss/valid")] == [2, 4]
    assert all(e.value > 0 for e in events.Scalars("throughput/tokens_per_s"))

    out = log.getvalue().splitlines()
    steps = [line for line in out if line.startswith("iteration")]
    assert len(steps) == 2  # every log_interval steps
    assert re.match(r"iteration 2/4 \| consumed samples 8 \| loss \d+\.\d{4} \| segment losses( \d+\.\d{3}){4} \| "
                    r"lr \S+ \| grad norm \d+\.\d+ \| [\d,]+ tokens/s \| [\d,]+ ms/iter \| peak mem [\d,]+ MiB \| "
                    r"ETA \d+:\d\d:\d\d$", steps[0]), steps[0]
    assert steps[1].endswith("ETA 0:00:00")
    assert sum(line.startswith("validation at iteration") for line in out) == 2
    assert any(line.startswith("saved checkpoint") for line in out)


def test_log_line_eta_uses_recent_step_times():
    out = io.StringIO()
    monitor = TrainingMonitor(None, log_interval=5, train_iters=100, out=out)
    for it in range(1, 11):
        monitor.record_step(it, 3.0, [3.1, 2.9], 1e-3, 1.0, tokens=1000, seconds=2.0, consumed_samples=it)
    last = out.getvalue().splitlines()[-1]
    assert "iteration  10/100" in last and "500 tokens/s" in last and "2,000 ms/iter" in last
    assert last.endswith("ETA 0:03:00")  # 90 steps x 2 s
    assert "segment losses 3.100 2.900" in last
    assert format_duration(3725) == "1:02:05"
