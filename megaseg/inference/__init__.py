"""Inference: segmented prefill/decode engine, sampling and the prefill memory model."""
from megaseg.inference.engine import BatchState, GenerationResult, GenerationStats, InferenceEngine
from megaseg.inference.memory_model import MemoryEstimate, predict_prefill_memory
from megaseg.inference.sampling import SamplingConfig, sample

__all__ = ["BatchState", "GenerationResult", "GenerationStats", "InferenceEngine", "MemoryEstimate", "SamplingConfig",
           "predict_prefill_memory", "sample"]
