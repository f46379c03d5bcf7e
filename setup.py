"""megaseg: segmented-attention pretraining on megatron-core."""

from setuptools import find_namespace_packages, setup

setup(
    name="megaseg",
    version="0.1.0",
    description="Segmented-attention long-context pretraining on megatron-core",
    python_requires=">=3.11",
    packages=find_namespace_packages(include=["megaseg", "megaseg.*"], exclude=["*.__pycache__"]),
    install_requires=[
        # Any CUDA build on GPU machines; requirements.txt pins the CPU build CI runs on.
        "torch>=2.4",
        # The CPU compatibility layer patches internals of exactly this release.
        "megatron-core==0.16.1",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        # dist_checkpointing save imports it without declaring it.
        "psutil",
        "pyyaml",
        "numpy",
    ],
    extras_require={
        "hf": ["transformers"],
        # triton: its interpreter runs the fused attention kernel's tests on CPU.
        # deepspeed: a 15 s install with no version changes to the pinned packages; its ZeRO tests
        # run on CPU over gloo.
        "test": ["pytest", "transformers", "triton", "lm-eval[hf]", "deepspeed==0.19.8", "zstandard==0.25.0"],
        # Evaluation: lm-evaluation-harness on exports (HF backend); plots and progress bars
        # of tools/evaluate.py (both optional at run time).
        "eval": ["lm-eval[hf]", "transformers", "matplotlib", "tqdm"],
        # tools/bench_inference.py and tools/bench_tbptt.py: stock peers and the plot.
        "bench": ["transformers", "matplotlib"],
        # Optional GPU speed-ups. apex is not needed: megatron-core falls back to torch
        # implementations, and apex is built from source rather than installed from PyPI.
        "gpu": ["transformer-engine", "triton", "deepspeed"],
        # tools/preprocess_data.py inputs: parquet, Hugging Face datasets folders, .jsonl.zst.
        "data": ["pyarrow", "datasets", "zstandard"],
        # DeepSpeed ZeRO-1/2 (--deepspeed); runs on CPU over gloo as well.
        "deepspeed": ["deepspeed==0.19.8"],
    },
)
