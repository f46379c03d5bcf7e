"""RMSNorm for megatron-core's local (no Transformer Engine) layer spec.

The reference model's RMSNorm (`megaseg.ops.norm`: fp32 statistics, weight applied in
the input dtype) behind megatron's norm constructor. megatron's own local choice,
`WrappedTorchNorm`, refuses sequence parallelism; this one marks its weight
`sequence_parallel` so that `finalize_model_grads` all-reduces its gradient over the
tensor-parallel group, as megatron does for its fused norms.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from megaseg.ops.norm import RMSNorm as _ReferenceRMSNorm


class RMSNorm(_ReferenceRMSNorm):
    """RMSNorm(config, hidden_size, eps): megatron's norm signature; parameter ``weight``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization={config.normalization!r}: this module implements 'RMSNorm' only")
        super().__init__(hidden_size, eps)
        self.weight.data = self.weight.data.to(config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
