"""Fused Triton kernel for segmented attention (forward and backward).

One launch computes the attention of a whole `SegmentBatch`: every segment, every query
head, every access mode. A program takes a block of queries of one head in one segment and
streams first its KV group's prefix (carried tail or retrieved tokens; the mode only shows
up as the valid length ``prefix_len[n, g]``) and then its own segment's keys up to the
causal limit, with an online softmax (FlashAttention-2 style).

* RoPE re-indexing (docs/semantics.md §3) is a small Triton pass before the attention launch that
  rotates q, k and the prefix keys at their per-segment, per-group positions (prefix slot
  p at p, segment key t at prefix_len + t, query a at prefix_len + q_offset + a) from fp32
  cos/sin tables, computing positions from ``prefix_len`` in the kernel. Rotating once,
  rather than inside the attention loop, keeps every key block from being re-rotated for
  each query block that reads it. The same pass, with the rotation transposed, turns the
  gradients of the rotated operands into those of the un-rotated inputs.
* GQA: query head h reads KV group h // heads_per_group directly (no K/V expansion).
* Masks: prefix slots past prefix_len and future keys are masked by index arithmetic; no
  mask tensor exists.

Backward recomputes the probabilities from the saved log-sum-exp: one kernel for dQ (per
query block, like the forward) and one for dK/dV (per key block and KV group, summing the
group's query heads in registers, so no atomics), launched once for prefix blocks and once
for segment blocks.

Runs on CUDA, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the test suite checks it against the SDPA
reference; `compile_for` compiles it for a given GPU architecture without a GPU. Block
sizes for CUDA are untuned defaults.

Shape legend as in `megaseg.ops.kernels`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megaseg.ops.kernels import SegmentBatch

_LOG2E = 1.4426950408889634


@triton.jit
def _rope_kernel(
    X, Y, PLEN, COS, SIN,
    sx_b, sx_n, sx_t, sx_h,
    N, HX, G, L, pos_offset,
    HPG: tl.constexpr, USE_PLEN: tl.constexpr, INVERSE: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Y = X rotated (rotate-half RoPE) at positions pos_offset + t (+ prefix_len[n, h // HPG]
    with USE_PLEN); INVERSE applies the transposed rotation. X, Y: [B, N, L, HX, D], same strides."""
    pid_t = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % HX
    n = (pid // HX) % N
    b = (pid // (HX * N)).to(tl.int64)  # batch offsets may pass 2**31 elements
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    sw_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    mask = (offs_t < L)[:, None] & (offs_d < D)[None, :]
    rows = b * sx_b + n * sx_n + h * sx_h + offs_t[:, None] * sx_t
    x = tl.load(X + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_sw = tl.load(X + rows + sw_d[None, :], mask=mask, other=0.0).to(tl.float32)
    pos = pos_offset + offs_t
    if USE_PLEN:
        pos = pos + tl.load(PLEN + n * G + h // HPG)
    cos = tl.load(COS + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    y = x * cos + sign[None, :] * x_sw * sin
    tl.store(Y + rows + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, PLEN, O, LSE,
    sq_b, sq_n, sq_t, sq_h,
    sk_b, sk_n, sk_t, sk_g,
    sp_b, sp_n, sp_t, sp_g,
    N, H, G, NQ, q_offset, qk_scale,
    HPG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Output and log2-sum-exp of a block of (rotated) queries of one head in one segment."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % H
    n = (pid // H) % N
    b = (pid // (H * N)).to(tl.int64)  # batch offsets may pass 2**31 elements
    g = h // HPG
    mm = tl.float32 if UPCAST else Q.dtype.element_ty  # the interpreter's bf16/fp16 dot is wrong: fp32 operands
    plen = tl.load(PLEN + n * G + g)
    klen = q_offset + NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    m_ok = offs_m < NQ
    q_rows = Q + b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_rows, mask=m_ok[:, None] & d_ok, other=0.0).to(mm)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The group's prefix: every valid slot is visible to every query.
    p_base = b * sp_b + n * sp_n + g * sp_g
    for start in range(0, plen, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < plen
        kv = p_base + offs_n[:, None] * sp_t + offs_d[None, :]
        k = tl.load(PK + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        v = tl.load(PV + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty).to(mm), v, input_precision=PREC)
        m_i = m_new

    # The segment itself, causally.
    k_base = b * sk_b + n * sk_n + g * sk_g
    hi = tl.minimum(q_offset + (pid_m + 1) * BLOCK_M, klen)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        kv = k_base + offs_n[:, None] * sk_t + offs_d[None, :]
        k = tl.load(K + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        v = tl.load(V + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= (q_offset + offs_m)[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty).to(mm), v, input_precision=PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_rows = O + b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    tl.store(o_rows, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok)
    tl.store(LSE + pid * NQ + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, PLEN, DO, LSE, DELTA, DQ,
    sq_b, sq_n, sq_t, sq_h,
    sk_b, sk_n, sk_t, sk_g,
    sp_b, sp_n, sp_t, sp_g,
    N, H, G, NQ, q_offset, qk_scale, sm_scale,
    HPG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dL/d(rotated q) for a block of queries of one head (DO, DQ laid out like Q)."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % H
    n = (pid // H) % N
    b = (pid // (H * N)).to(tl.int64)  # batch offsets may pass 2**31 elements
    g = h // HPG
    dtype = Q.dtype.element_ty
    mm = tl.float32 if UPCAST else dtype
    plen = tl.load(PLEN + n * G + g)
    klen = q_offset + NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    m_ok = offs_m < NQ
    md_ok = m_ok[:, None] & d_ok
    row = b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(Q + row, mask=md_ok, other=0.0).to(mm)
    do = tl.load(DO + row, mask=md_ok, other=0.0).to(dtype).to(mm)
    lse = tl.load(LSE + pid * NQ + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid * NQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    p_base = b * sp_b + n * sp_n + g * sp_g
    for start in range(0, plen, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < plen
        kv = p_base + offs_n[:, None] * sp_t + offs_d[None, :]
        k = tl.load(PK + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        v = tl.load(PV + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(n_ok[None, :] & m_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype).to(mm), k, input_precision=PREC)

    k_base = b * sk_b + n * sk_n + g * sk_g
    hi = tl.minimum(q_offset + (pid_m + 1) * BLOCK_M, klen)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        kv = k_base + offs_n[:, None] * sk_t + offs_d[None, :]
        k = tl.load(K + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        v = tl.load(V + kv, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= (q_offset + offs_m)[:, None]) & m_ok[:, None]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype).to(mm), k, input_precision=PREC)

    tl.store(DQ + row, dq * sm_scale, mask=md_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, KX, VX, PLEN, DO, LSE, DELTA, DKX, DVX,
    sq_b, sq_n, sq_t, sq_h,
    sx_b, sx_n, sx_t, sx_g,
    N, H, G, NQ, q_offset, qk_scale, sm_scale, XLEN,
    IS_PREFIX: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dL/d(rotated k) and dL/dv for a block of prefix (IS_PREFIX) or segment keys of one
    group, summed over the group's query heads. KX/VX/DKX/DVX share strides sx_*; XLEN is
    the key axis length (P or K)."""
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    g = pid % G
    n = (pid // G) % N
    b = (pid // (G * N)).to(tl.int64)  # batch offsets may pass 2**31 elements
    dtype = Q.dtype.element_ty
    mm = tl.float32 if UPCAST else dtype
    plen = tl.load(PLEN + n * G + g)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    if IS_PREFIX:
        n_ok = offs_n < plen
        q_lo = 0
        q_hi = tl.where(pid_n * BLOCK_N < plen, NQ, 0)
    else:
        n_ok = offs_n < XLEN
        q_lo = (tl.maximum(pid_n * BLOCK_N - q_offset, 0) // BLOCK_M) * BLOCK_M
        q_hi = NQ
    x_rows = b * sx_b + n * sx_n + g * sx_g + offs_n[:, None] * sx_t + offs_d[None, :]
    k = tl.load(KX + x_rows, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
    v = tl.load(VX + x_rows, mask=n_ok[:, None] & d_ok, other=0.0).to(mm)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for hh in range(HPG):
        h = g * HPG + hh
        bnh = (b * N + n) * H + h
        q_base = b * sq_b + n * sq_n + h * sq_h
        for m0 in range(q_lo, q_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < NQ
            q_rows = q_base + offs_m[:, None] * sq_t + offs_d[None, :]
            q = tl.load(Q + q_rows, mask=m_ok[:, None] & d_ok, other=0.0).to(mm)
            do = tl.load(DO + q_rows, mask=m_ok[:, None] & d_ok, other=0.0).to(dtype).to(mm)
            lse = tl.load(LSE + bnh * NQ + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bnh * NQ + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
            ok = m_ok[:, None] & n_ok[None, :]
            if not IS_PREFIX:
                ok = ok & (offs_n[None, :] <= (q_offset + offs_m)[:, None])
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(dtype).to(mm)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(dtype).to(mm)), q, input_precision=PREC)

    store_ok = (offs_n < XLEN)[:, None] & d_ok
    tl.store(DKX + x_rows, (dk * sm_scale).to(DKX.dtype.element_ty), mask=store_ok)
    tl.store(DVX + x_rows, dv.to(DVX.dtype.element_ty), mask=store_ok)


# ----------------------------------------------------------------------------------------
def _blocks(device: torch.device, head_dim: int) -> dict:
    """Block sizes and launch options; tiny blocks under the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_T": 16, "launch": {}}
    if head_dim <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 64, "launch": {"num_warps": 4, "num_stages": 3}}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 32, "launch": {"num_warps": 4, "num_stages": 2}}


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _rope(x, plen, cos, sin, *, pos_offset=0, heads_per_group=1, use_plen=True, inverse=False, dtype=None):
    """x [B, N, L, X, D] rotated at its positions (see `_rope_kernel`), as ``dtype``."""
    B, N, L, X, D = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=dtype or x.dtype)
    if x.numel() == 0:
        return y
    cfg = _blocks(x.device, D)
    _rope_kernel[(triton.cdiv(L, cfg["BLOCK_T"]), B * N * X)](
        x, y, plen, cos, sin, *_strides(x), N, X, plen.shape[1], L, pos_offset,
        HPG=heads_per_group, USE_PLEN=use_plen, INVERSE=inverse,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=cfg["BLOCK_T"],
        **({"num_warps": 4} if x.device.type == "cuda" else {}),
    )
    return y


class _SegmentedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, plen, q_offset, cos, sin):
        B, N, Q, H, D = q.shape
        G = k.shape[3]
        hpg = H // G
        P = 0 if pk is None else pk.shape[2]
        cfg = _blocks(q.device, D)
        q_rot = _rope(q, plen, cos, sin, pos_offset=q_offset, heads_per_group=hpg)
        k_rot = _rope(k, plen, cos, sin)
        pk_rot = _rope(pk, plen, cos, sin, use_plen=False) if P else k_rot  # never read when P == 0
        pv_ = pv if P else v
        o = torch.empty_like(q)
        lse = torch.empty(B, N, H, Q, device=q.device, dtype=torch.float32)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        _fwd_kernel[(triton.cdiv(Q, cfg["BLOCK_M"]), B * N * H)](
            q_rot, k_rot, v, pk_rot, pv_, plen, o, lse,
            *_strides(q_rot), *_strides(k_rot), *_strides(pk_rot),
            N, H, G, Q, q_offset, _LOG2E / math.sqrt(D),
            HPG=hpg, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec, UPCAST=q.device.type != "cuda",
            **cfg["launch"],
        )
        ctx.save_for_backward(q_rot, k_rot, v, pk_rot, pv_, plen, cos, sin, o, lse)
        ctx.q_offset, ctx.has_prefix, ctx.prec = q_offset, bool(P), prec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, plen, cos, sin, o, lse = ctx.saved_tensors  # q/k/pk rotated
        q_offset = ctx.q_offset
        B, N, Q, H, D = q.shape
        G, K = k.shape[3], k.shape[2]
        P = pk.shape[2] if ctx.has_prefix else 0
        hpg = H // G
        cfg = _blocks(q.device, D)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).permute(0, 1, 3, 2).contiguous()  # [B, N, H, Q]
        common = dict(HPG=hpg, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=ctx.prec,
                      UPCAST=q.device.type != "cuda", **cfg["launch"])
        qk_scale, sm_scale = _LOG2E / math.sqrt(D), 1.0 / math.sqrt(D)

        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        _bwd_dq_kernel[(triton.cdiv(Q, cfg["BLOCK_M"]), B * N * H)](
            q, k, v, pk, pv, plen, do, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(pk),
            N, H, G, Q, q_offset, qk_scale, sm_scale, **common,
        )
        dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        _bwd_dkdv_kernel[(triton.cdiv(K, cfg["BLOCK_N"]), B * N * G)](
            q, k, v, plen, do, lse, delta, dk, dv,
            *_strides(q), *_strides(k),
            N, H, G, Q, q_offset, qk_scale, sm_scale, K, IS_PREFIX=False, **common,
        )
        dpk = dpv = None
        if P:
            dpk = torch.empty(pk.shape, device=pk.device, dtype=torch.float32)
            dpv = torch.empty(pv.shape, device=pv.device, dtype=pv.dtype)
            _bwd_dkdv_kernel[(triton.cdiv(P, cfg["BLOCK_N"]), B * N * G)](
                q, pk, pv, plen, do, lse, delta, dpk, dpv,
                *_strides(q), *_strides(pk),
                N, H, G, Q, q_offset, qk_scale, sm_scale, P, IS_PREFIX=True, **common,
            )
        # Gradients of the rotated operands -> of the un-rotated inputs (transposed rotation).
        dq = _rope(dq, plen, cos, sin, pos_offset=q_offset, heads_per_group=hpg, inverse=True, dtype=q.dtype)
        dk = _rope(dk, plen, cos, sin, inverse=True, dtype=k.dtype)
        if P:
            dpk = _rope(dpk, plen, cos, sin, use_plen=False, inverse=True, dtype=pk.dtype)
        return dq, dk, dv, dpk, dpv, None, None, None, None


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for(arch: int, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128,
                heads_per_group: int = 4) -> dict[str, dict]:
    """Compile the forward and backward kernels ahead of time for an NVIDIA GPU of compute
    capability ``arch`` (e.g. 90 for H100/H200) with the launch configuration `attend`
    uses, down to a cubin; no GPU is needed (triton's bundled ptxas does the last step).
    Returns per kernel its shared memory bytes and warps, and raises on any compile error.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _blocks(torch.device("cuda"), head_dim)
    elem = "*" + _TRITON_TYPES[dtype]
    common = dict(HPG=heads_per_group, D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  PREC="ieee" if dtype == torch.float32 else "tf32", UPCAST=False)
    fp32_ptrs = {"COS", "SIN", "LSE", "DELTA", "DQ", "DKX"}
    floats = {"qk_scale", "sm_scale"}
    rope = dict(D=head_dim, BLOCK_D=common["BLOCK_D"], BLOCK_T=cfg["BLOCK_T"], USE_PLEN=True, HPG=heads_per_group)
    launches = {
        "rope": (_rope_kernel, {**rope, "INVERSE": False}, {}),
        "rope_inverse": (_rope_kernel, {**rope, "INVERSE": True}, {"X": "*fp32"}),
        "forward": (_fwd_kernel, common, {}),
        "backward_dq": (_bwd_dq_kernel, common, {}),
        "backward_dkdv_prefix": (_bwd_dkdv_kernel, {**common, "IS_PREFIX": True}, {}),
        "backward_dkdv_segment": (_bwd_dkdv_kernel, {**common, "IS_PREFIX": False}, {}),
    }
    out = {}
    for name, (fn, consts, types) in launches.items():
        constexprs = {k: v for k, v in consts.items() if k in fn.arg_names}
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in types:
                signature[arg] = types[arg]
            elif arg == "PLEN":
                signature[arg] = "*i32"
            elif arg in fp32_ptrs:
                signature[arg] = "*fp32"
            elif arg in ("Q", "K", "V", "PK", "PV", "O", "DO", "KX", "VX", "DVX", "X", "Y"):
                signature[arg] = elem
            else:
                signature[arg] = "fp32" if arg in floats else "i32"
        options = dict(cfg["launch"]) if fn is not _rope_kernel else {"num_warps": 4}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        out[name] = {"shared_bytes": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                     "cubin_bytes": len(kernel.asm["cubin"])}
    return out


def attend(batch: SegmentBatch, rotary) -> torch.Tensor:
    """Attention output [B, N, Q, H, D] of ``batch`` (see `SegmentBatch`), one fused launch."""
    q = batch.q.contiguous()
    k, v = batch.k.to(q.dtype).contiguous(), batch.v.to(q.dtype).contiguous()
    D = q.shape[-1]
    P = batch.prefix_slots
    pk = batch.prefix_k.contiguous() if P else None
    pv = batch.prefix_v.contiguous() if P else None
    if pk is not None:
        pk, pv = pk.to(q.dtype).contiguous(), pv.to(q.dtype).contiguous()
    plen = batch.prefix_len.to(device=q.device, dtype=torch.int32).contiguous()
    # Largest position: a full prefix followed by the whole segment.
    cos, sin = rotary.tables(P + k.shape[2], q.device, torch.float32)
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape[1] != D:
        raise ValueError(f"rotary tables have head dim {cos.shape[1]}, the batch {D}")
    return _SegmentedAttention.apply(q, k, v, pk, pv, plen, batch.q_offset, cos, sin)
