"""Inference: segmented prefill/decode engine, sampling and the prefill memory model."""
from megaseg.inference.engine import BatchState, GenerationResult, GenerationStats, InferenceEngine
from megaseg.inference.sampling import SamplingConfig, sample

__all__ = ["BatchState", "GenerationResult", "GenerationStats", "InferenceEngine", "SamplingConfig", "sample"]
