"""The alignment experiment's settings (`ExperimentConfig`) and its variants: the segment
configuration, head plan and model configuration each trains with, and the segmented
inference mode each is evaluated under.

    full        one segment covers the sequence (S = T, M = R = 0): plain causal attention
    tbptt1      megaseg S, M, R, K = 1 with long-range (retrieval) heads
    tbptt0      the same with K = 0 (every tail detached)
    m0          K = 1 but M = 0 (no carried tail)
    no_lr       K = 1, no long-range layers (all heads `local`, R = 0)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megaseg.config import ConfigError, HeadPlan, ModelConfig, RopeConfig, SegmentConfig
from megaseg.eval.loading import ByteTokenizer
from megaseg.eval.modes import InferenceMode
from megaseg.eval.tasks import check_task

VARIANTS = ("full", "tbptt1", "tbptt0", "m0", "no_lr")


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
