"""Triton kernel vs the SDPA kernel on small random problems: errors, as JSON.

Triton's interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is
imported, which would affect every later triton user of a process; so the cases run in a
child process (`test_triton_kernel.py` starts ``python -m tests.ops.triton_cases`` with the
variable set) and report their errors here, and the parent asserts on them. On a CUDA
machine the same module runs the cases on the GPU (``--device cuda``).

Each case reports ``fwd`` (max |triton - sdpa| of the output) and ``grad`` (per input,
max |difference| / max |sdpa gradient|). bf16 cases also report the error of the SDPA
path itself in bf16 against fp32 (``fwd_sdpa_bf16`` / ``grad_sdpa_bf16``), the scale a bf16
kernel is judged by.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch

# name -> (kind, seed, dtype). "batch" cases call the kernels directly on a random
# SegmentBatch; "operator" cases run SegmentedAttention end to end (random head plan,
# GQA, uneven last segment, a run continued from an open segment).
CASES = {
    "batch_fp32_gqa": ("batch", 0, "float32"),
    "batch_fp32_open_segment": ("batch", 1, "float32"),
    "batch_fp32_mha_d8": ("batch", 2, "float32"),
    "batch_fp32_long_prefix": ("batch", 3, "float32"),
    "batch_bf16": ("batch", 4, "bfloat16"),
    "operator_fp32_all_modes": ("operator", 5, "float32"),
    "operator_fp32_random_plan": ("operator", 6, "float32"),
    "operator_bf16_all_modes": ("operator", 7, "bfloat16"),
}


def _batch_problem(seed, dtype, device):
    from megaseg.ops.kernels import SegmentBatch

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, N = rng.choice([(1, 3), (2, 2)])
    G, hpg = rng.choice([(2, 2), (1, 3), (3, 1), (2, 4)])
    D = 8 if seed == 2 else rng.choice([16, 32])
    if seed == 2:
        G, hpg = 3, 1
    Q = rng.randint(5, 20)
    q_offset = rng.randint(1, 6) if seed == 1 else 0
    P = rng.randint(20, 40) if seed == 3 else rng.randint(1, 12)
    H, K = G * hpg, q_offset + Q
    # Valid prefix lengths per segment and group: 0 (segment mode / first segment), full, partial.
    plen = torch.tensor([[rng.choice([0, P, rng.randint(1, P)]) for _ in range(G)] for _ in range(N)])
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    tensors = [make(B, N, Q, H, D), make(B, N, K, G, D), make(B, N, K, G, D), make(B, N, P, G, D), make(B, N, P, G, D)]
    for t in tensors:
        t.requires_grad_(True)

    def run(kernel, ts):
        return kernel(SegmentBatch(*ts, plen.to(device), q_offset))

    return tensors, run, D


def _operator_problem(seed, dtype, device):
    from megaseg.config import LOCAL, MODES, RETRIEVAL, SEGMENT, RopeConfig, SegmentConfig
    from megaseg.ops.segmented_attention import SegmentedAttention

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    S = rng.choice([8, 12])
    M, R = rng.randint(1, S), rng.randint(1, 2 * S)
    G, hpg, D = rng.choice([(3, 2, 16), (4, 2, 16), (3, 1, 32)])
    modes = (LOCAL, RETRIEVAL, SEGMENT) + (LOCAL,) * (G - 3) if seed != 6 else tuple(rng.choice(MODES) for _ in range(G))
    T = rng.randint(3 * S + 1, 4 * S - 1)  # uneven last segment
    split = rng.randint(S + 1, 2 * S - 1)  # the second call continues an open segment
    B, H = 2, G * hpg
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    tensors = [make(B, T, H, D), make(B, T, G, D), make(B, T, G, D)]
    for t in tensors:
        t.requires_grad_(True)
    segment = SegmentConfig(S, M, R, 1, "sum")

    def run(kernel_name, ts):
        op = SegmentedAttention(modes, segment, RopeConfig(theta=500.0), D, hpg, kernel=kernel_name).to(device)
        q, k, v = ts
        o1, state = op(q[:, :split], k[:, :split], v[:, :split])
        o2, _ = op(q[:, split:], k[:, split:], v[:, split:], state)
        return torch.cat([o1, o2], 1)

    return tensors, run, D


def _errors(out, ref, grads, ref_grads):
    fwd = (out.float() - ref.float()).abs().max().item()
    grad = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for a, b in zip(grads, ref_grads)]
    return fwd, grad


def run_case(name: str, device: str = "cpu") -> dict:
    from megaseg.config import RopeConfig
    from megaseg.ops.kernels import sdpa, triton_segmented
    from megaseg.ops.rope import Rotary

    kind, seed, dtype_name = CASES[name]
    dtype = getattr(torch, dtype_name)
    problem = _batch_problem if kind == "batch" else _operator_problem
    tensors, run, D = problem(seed, dtype, device)
    if kind == "batch":
        rotary = Rotary(RopeConfig(theta=500.0), D).to(device)
        kernels = {"triton": lambda b: triton_segmented.attend(b, rotary), "sdpa": lambda b: sdpa.attend(b, rotary)}
    else:
        kernels = {"triton": "triton", "sdpa": "sdpa"}
    g = torch.Generator().manual_seed(seed + 100)

    def fwd_bwd(kernel, ts, cotangent=None):
        out = run(kernel, ts)
        if cotangent is None:
            cotangent = torch.randn(out.shape, generator=g).to(device=device, dtype=out.dtype)
        grads = torch.autograd.grad(out, ts, cotangent.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(ts, grads)]
        return out, grads, cotangent

    ref, ref_grads, cot = fwd_bwd(kernels["sdpa"], tensors)
    out, grads, _ = fwd_bwd(kernels["triton"], tensors, cot)
    fwd, grad = _errors(out, ref, grads, ref_grads)
    result = {"dtype": dtype_name, "fwd": fwd, "grad": grad}
    if dtype != torch.float32:
        # The bf16 yardstick: both kernels against the fp32 SDPA result.
        ts32 = [t.detach().float().requires_grad_(True) for t in tensors]
        ref32, ref32_grads, _ = fwd_bwd(kernels["sdpa"], ts32, cot.float())
        result["fwd"], result["grad"] = _errors(out, ref32, grads, ref32_grads)
        result["fwd_sdpa_bf16"], result["grad_sdpa_bf16"] = _errors(ref, ref32, ref_grads, ref32_grads)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.cases:
        try:
            results[name] = run_case(name, args.device)
        except Exception as exc:  # reported per case; the parent fails that case with the message
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
