"""Typed configuration for segmented execution (docs/semantics.md §1–5) and the reference model.

Every dataclass validates itself at construction; a bad value raises ``ConfigError`` whose
message names the field, the value and what is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

LOCAL = "local"
RETRIEVAL = "retrieval"
SEGMENT = "segment"
MODES = (LOCAL, RETRIEVAL, SEGMENT)

GROUP_REDUCTIONS = ("sum", "max")

# LLaMA2-7B long-range layers from the paper (0-based layer indices).
PAPER_LLAMA2_7B_LONG_RANGE_LAYERS = (6, 8, 11, 18)


class ConfigError(ValueError):
    """A configuration value a user can fix; the message says which field and how."""


def _fail(field_name: str, value, allowed: str):
    raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class SegmentConfig:
    """Segment settings.

    segment_length  S: tokens per segment (the last segment of a sequence may be shorter).
    tail_length     M: carried KV tail of the previous segment for `local` heads, 0 <= M <= S.
    retrieval_length R: retrieved prefix for `retrieval` heads (top-R pool tokens), R >= 0.
    tbptt_k         K: segments a loss reaches back through the carried tails (0 = detach all,
                    -1 = untruncated: the gradient of the one-pass forward).
    retrieval_group_reduce: how the query heads of one KV group combine their scores of a
                    pool key (docs/semantics.md §4 choice): "sum" (default) or "max".
    """

    segment_length: int = 4096
    tail_length: int = 512
    retrieval_length: int = 512
    tbptt_k: int = 1
    retrieval_group_reduce: str = "sum"

    def __post_init__(self):
        for name in ("segment_length", "tail_length", "retrieval_length", "tbptt_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                _fail(name, v, "must be an integer")
        if self.segment_length <= 0:
            _fail("segment_length", self.segment_length, "must be > 0")
        if self.tail_length < 0:
            _fail("tail_length", self.tail_length, "must be >= 0")
        if self.tail_length > self.segment_length:
            _fail(
                "tail_length",
                self.tail_length,
                f"must be <= segment_length ({self.segment_length}): the tail is cut from one segment",
            )
        if self.retrieval_length < 0:
            _fail("retrieval_length", self.retrieval_length, "must be >= 0")
        if self.tbptt_k < -1:
            _fail("tbptt_k", self.tbptt_k, "must be >= 0 (0 detaches every tail), or -1 for the untruncated gradient")
        if self.retrieval_group_reduce not in GROUP_REDUCTIONS:
            _fail("retrieval_group_reduce", self.retrieval_group_reduce, f"allowed: {GROUP_REDUCTIONS}")

    @property
    def max_prefix(self) -> int:
        return max(self.tail_length, self.retrieval_length)

    @property
    def max_rope_position(self) -> int:
        """Largest rotary position ever used: S + max(M, R) - 1, for any sequence length."""
        return self.segment_length + self.max_prefix - 1


@dataclass(frozen=True)
class HeadPlan:
    """Access mode of each (layer, KV group): ``modes[layer][group]`` in MODES."""

    modes: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        modes = tuple(tuple(layer) for layer in self.modes)
        object.__setattr__(self, "modes", modes)
        if not modes:
            _fail("head_plan.modes", modes, "needs at least one layer")
        width = len(modes[0])
        if width == 0:
            _fail("head_plan.modes[0]", modes[0], "needs at least one KV group")
        for li, layer in enumerate(modes):
            if len(layer) != width:
                _fail(f"head_plan.modes[{li}]", layer, f"every layer needs {width} KV groups like layer 0")
            for gi, m in enumerate(layer):
                if m not in MODES:
                    _fail(f"head_plan.modes[{li}][{gi}]", m, f"allowed modes are {MODES}")

    @property
    def num_layers(self) -> int:
        return len(self.modes)

    @property
    def num_kv_groups(self) -> int:
        return len(self.modes[0])

    def layer(self, index: int) -> tuple[str, ...]:
        return self.modes[index]

    def has_retrieval(self) -> bool:
        return any(m == RETRIEVAL for layer in self.modes for m in layer)

    def count(self, mode: str) -> int:
        return sum(m == mode for layer in self.modes for m in layer)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def all_local(cls, num_layers: int, num_kv_groups: int) -> "HeadPlan":
        _check_shape(num_layers, num_kv_groups)
        return cls(tuple((LOCAL,) * num_kv_groups for _ in range(num_layers)))

    @classmethod
    def from_long_heads(
        cls,
        num_layers: int,
        num_kv_groups: int,
        long_range_layers: Sequence[int],
        long_range_heads: Sequence[int] | Mapping[int, Sequence[int]],
    ) -> "HeadPlan":
        """docs/semantics.md §2 default plan.

        ``long_range_heads`` is the set H_long of KV groups: in long-range layers they are
        `retrieval`, in every other layer `segment`; all other groups are `local`.
        A mapping ``{layer: groups}`` gives H_long per layer explicitly (layers it omits
        have no long heads).
        """
        _check_shape(num_layers, num_kv_groups)
        lr = _check_indices("long_range_layers", long_range_layers, num_layers, "layer")
        if isinstance(long_range_heads, Mapping):
            per_layer = {}
            for layer, groups in long_range_heads.items():
                _check_indices("long_range_heads (layer key)", [layer], num_layers, "layer")
                per_layer[int(layer)] = _check_indices(f"long_range_heads[{layer}]", groups, num_kv_groups, "KV group")
        else:
            groups = _check_indices("long_range_heads", long_range_heads, num_kv_groups, "KV group")
            per_layer = {layer: groups for layer in range(num_layers)}
        modes = []
        for layer in range(num_layers):
            long = per_layer.get(layer, ())
            long_mode = RETRIEVAL if layer in lr else SEGMENT
            modes.append(tuple(long_mode if g in long else LOCAL for g in range(num_kv_groups)))
        return cls(tuple(modes))

    @classmethod
    def prior(cls, num_layers, num_kv_groups, long_range_layers, long_range_heads) -> "HeadPlan":
        """`prior` preset: an explicit list of long-range KV groups (or a per-layer mapping)."""
        return cls.from_long_heads(num_layers, num_kv_groups, long_range_layers, long_range_heads)

    @classmethod
    def contiguous(cls, num_layers, num_kv_groups, long_range_layers, num_long_range_heads: int) -> "HeadPlan":
        """`contiguous` preset: H_long is the first ``num_long_range_heads`` KV groups."""
        _check_count(num_long_range_heads, num_kv_groups)
        return cls.from_long_heads(num_layers, num_kv_groups, long_range_layers, list(range(num_long_range_heads)))

    @classmethod
    def interleaved(cls, num_layers, num_kv_groups, long_range_layers, num_long_range_heads: int) -> "HeadPlan":
        """`interleaved` preset: ``num_long_range_heads`` KV groups spread evenly over the groups."""
        _check_count(num_long_range_heads, num_kv_groups)
        groups = [(i * num_kv_groups) // num_long_range_heads for i in range(num_long_range_heads)] if num_long_range_heads else []
        return cls.from_long_heads(num_layers, num_kv_groups, long_range_layers, groups)

    @classmethod
    def paper_llama2_7b(cls, num_long_range_heads: int = 8) -> "HeadPlan":
        """LLaMA2-7B (32 layers, 32 KV heads), long-range layers {6, 8, 11, 18}.

        The paper does not list its long-range heads; the default takes 8 of 32
        interleaved (a documented choice, change with ``num_long_range_heads``).
        """
        return cls.interleaved(32, 32, PAPER_LLAMA2_7B_LONG_RANGE_LAYERS, num_long_range_heads)

    @classmethod
    def preset(cls, name: str, num_layers: int, num_kv_groups: int, long_range_layers=(), long_range_heads=None,
               num_long_range_heads: int = 0) -> "HeadPlan":
        """Build a plan by preset name: local | prior | contiguous | interleaved | paper-llama2-7b."""
        if name == "local":
            return cls.all_local(num_layers, num_kv_groups)
        if name == "prior":
            if long_range_heads is None:
                _fail("long_range_heads", None, "the `prior` preset needs an explicit list of KV groups")
            return cls.prior(num_layers, num_kv_groups, long_range_layers, long_range_heads)
        if name == "contiguous":
            return cls.contiguous(num_layers, num_kv_groups, long_range_layers, num_long_range_heads)
        if name == "interleaved":
            return cls.interleaved(num_layers, num_kv_groups, long_range_layers, num_long_range_heads)
        if name == "paper-llama2-7b":
            if (num_layers, num_kv_groups) != (32, 32):
                _fail("head_plan_preset", name, f"is for 32 layers x 32 KV heads, model has {num_layers} x {num_kv_groups}")
            return cls.paper_llama2_7b(num_long_range_heads or 8)
        _fail("head_plan_preset", name, "allowed: local, prior, contiguous, interleaved, paper-llama2-7b")

    def slice_groups(self, start: int, stop: int) -> "HeadPlan":
        """The plan restricted to KV groups [start, stop) (a tensor-parallel rank's slice)."""
        return HeadPlan(tuple(layer[start:stop] for layer in self.modes))

    def to_list(self) -> list[list[str]]:
        return [list(layer) for layer in self.modes]


def _check_shape(num_layers, num_kv_groups):
    if not isinstance(num_layers, int) or num_layers <= 0:
        _fail("num_layers", num_layers, "must be an integer > 0")
    if not isinstance(num_kv_groups, int) or num_kv_groups <= 0:
        _fail("num_kv_groups", num_kv_groups, "must be an integer > 0")


def _check_count(n, num_kv_groups):
    if not isinstance(n, int) or n < 0 or n > num_kv_groups:
        _fail("num_long_range_heads", n, f"must be an integer in [0, {num_kv_groups}] (the number of KV groups)")


def _check_indices(field_name, values, bound, what) -> tuple[int, ...]:
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < bound:
            _fail(field_name, list(values), f"every {what} index must be an integer in [0, {bound - 1}]; got {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        _fail(field_name, list(values), f"{what} indices must be distinct")
    return tuple(sorted(out))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding as Llama uses it: ``theta`` base and optional scaling.

    scaling_type: None | "linear" | "llama3". ``factor`` for both; llama3 also uses
    low_freq_factor, high_freq_factor and original_max_position_embeddings.
    """

    theta: float = 10000.0
    scaling_type: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.theta <= 0:
            _fail("rope.theta", self.theta, "must be > 0")
        if self.scaling_type not in (None, "linear", "llama3"):
            _fail("rope.scaling_type", self.scaling_type, "allowed: None, 'linear', 'llama3'")
        if self.factor <= 0:
            _fail("rope.factor", self.factor, "must be > 0")
        if self.scaling_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            _fail("rope.high_freq_factor", self.high_freq_factor, "must be > low_freq_factor for llama3 scaling")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture causal LM whose attention is the segmented operator."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2); no other linear has one
    rope: RopeConfig = field(default_factory=RopeConfig)
    segment: SegmentConfig = field(default_factory=lambda: SegmentConfig(1024, 128, 0, 1))
    head_plan: HeadPlan | None = None  # None = all `local`

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(name, v, "must be an integer > 0")
        if not isinstance(self.qkv_bias, bool):
            _fail("qkv_bias", self.qkv_bias, "must be true or false")
        for name, kind in (("rope", RopeConfig), ("segment", SegmentConfig)):
            if not isinstance(getattr(self, name), kind):
                _fail(name, getattr(self, name), f"must be a {kind.__name__}")
        if self.head_plan is not None and not isinstance(self.head_plan, HeadPlan):
            _fail("head_plan", self.head_plan, "must be a HeadPlan or None (all `local`)")
        if self.num_heads % self.num_kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads ({self.num_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                _fail("hidden_size", self.hidden_size, f"must be divisible by num_heads ({self.num_heads}) or set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be a positive even integer (rotary pairs)")
        if self.head_plan is None:
            object.__setattr__(self, "head_plan", HeadPlan.all_local(self.num_layers, self.num_kv_heads))
        plan = self.head_plan
        if plan.num_layers != self.num_layers:
            _fail("head_plan", f"{plan.num_layers} layers", f"must have num_layers={self.num_layers} layers")
        if plan.num_kv_groups != self.num_kv_heads:
            _fail("head_plan", f"{plan.num_kv_groups} KV groups", f"must have num_kv_heads={self.num_kv_heads} groups per layer")
        if self.segment.retrieval_length > 0 and not plan.has_retrieval():
            _fail(
                "retrieval_length",
                self.segment.retrieval_length,
                "is > 0 but the head plan has no `retrieval` heads; set it to 0 or add long-range layers/heads",
            )
        if plan.has_retrieval() and self.segment.retrieval_length == 0:
            _fail("retrieval_length", 0, "must be > 0 when the head plan has `retrieval` heads")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["head_plan"] = self.head_plan.to_list()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            _fail("model config", unknown, f"unknown keys; allowed: {sorted(known)}")
        if isinstance(d.get("rope"), Mapping):
            d["rope"] = RopeConfig(**d["rope"])
        if isinstance(d.get("segment"), Mapping):
            d["segment"] = SegmentConfig(**d["segment"])
        if d.get("head_plan") is not None and not isinstance(d["head_plan"], HeadPlan):
            d["head_plan"] = HeadPlan(tuple(tuple(x) for x in d["head_plan"]))
        return cls(**d)
