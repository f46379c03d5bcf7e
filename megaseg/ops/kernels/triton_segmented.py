"""Fused Triton kernel for segmented attention (forward and backward).

One launch computes a whole `SegmentBatch`: every segment, every query head, every access
mode. A program takes a block of queries of one head in one segment and streams first its
KV group's prefix (carried tail or retrieved tokens, ``prefix_len[n, g]`` valid slots: the
mode only shows up as that length) and then its own segment's keys up to the causal limit,
with an online softmax (FlashAttention-2 style). Inside the kernel:

* RoPE re-indexing (SEMANTICS §3): prefix slot p is rotated at position p, segment key t
  at prefix_len + t, query a at prefix_len + q_offset + a, from fp32 cos/sin tables; the
  caller's tensors stay un-rotated and no rotated copy is written.
* GQA: query head h reads KV group h // heads_per_group directly (no K/V expansion).
* Masks: prefix slots past prefix_len and future keys are masked by index arithmetic; no
  mask tensor exists.

Backward recomputes the probabilities from the saved log-sum-exp: one kernel for dQ
(per query block, like the forward) and one for dK/dV (per key block and KV group, summing
the group's query heads in registers, so no atomics), launched once for prefix blocks and
once for segment blocks. The kernels produce gradients with respect to the rotated
queries/keys; the inverse rotation is an elementwise epilogue in torch.

Runs on CUDA, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the test suite checks it against the SDPA
reference. Block sizes for CUDA are untuned defaults.

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
def _load_rotated(base, rows, row_ok, stride_t, pos, COS, SIN, offs_d, sw_d, sign, D: tl.constexpr):
    """Rows ``rows`` of a [*, D] slab at ``base`` (row stride ``stride_t``), rotated at ``pos``."""
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(base + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_sw = tl.load(base + rows[:, None] * stride_t + sw_d[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return x * cos + sign[None, :] * x_sw * sin


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, PLEN, COS, SIN, O, LSE,
    sq_b, sq_n, sq_t, sq_h,
    sk_b, sk_n, sk_t, sk_g,
    sp_b, sp_n, sp_t, sp_g,
    N, H, G, NQ, q_offset, qk_scale,
    HPG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % H
    n = (pid // H) % N
    b = pid // (H * N)
    g = h // HPG
    dtype = Q.dtype.element_ty
    mm = tl.float32 if UPCAST else dtype  # the interpreter's bf16/fp16 dot is wrong: fp32 operands
    plen = tl.load(PLEN + n * G + g)
    klen = q_offset + NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    sw_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    m_ok = offs_m < NQ
    q_base = Q + b * sq_b + n * sq_n + h * sq_h
    q = _load_rotated(q_base, offs_m, m_ok, sq_t, plen + q_offset + offs_m, COS, SIN, offs_d, sw_d, sign, D)
    q = q.to(dtype).to(mm)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The group's prefix: every valid slot is visible to every query.
    pk_base = PK + b * sp_b + n * sp_n + g * sp_g
    pv_base = PV + b * sp_b + n * sp_n + g * sp_g
    for start in range(0, plen, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < plen
        k = _load_rotated(pk_base, offs_n, n_ok, sp_t, offs_n, COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
        v = tl.load(pv_base + offs_n[:, None] * sp_t + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(mm), v, input_precision=PREC)
        m_i = m_new

    # The segment itself, causally.
    k_base = K + b * sk_b + n * sk_n + g * sk_g
    v_base = V + b * sk_b + n * sk_n + g * sk_g
    hi = tl.minimum(q_offset + (pid_m + 1) * BLOCK_M, klen)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        k = _load_rotated(k_base, offs_n, n_ok, sk_t, plen + offs_n, COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
        v = tl.load(v_base + offs_n[:, None] * sk_t + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= (q_offset + offs_m)[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(mm), v, input_precision=PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptr = O + b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + pid * NQ + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, PLEN, COS, SIN, DO, LSE, DELTA, DQ,
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
    b = pid // (H * N)
    g = h // HPG
    dtype = Q.dtype.element_ty
    mm = tl.float32 if UPCAST else dtype  # the interpreter's bf16/fp16 dot is wrong: fp32 operands
    plen = tl.load(PLEN + n * G + g)
    klen = q_offset + NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    sw_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    m_ok = offs_m < NQ
    md_ok = m_ok[:, None] & (offs_d < D)[None, :]
    row = b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = _load_rotated(Q + b * sq_b + n * sq_n + h * sq_h, offs_m, m_ok, sq_t, plen + q_offset + offs_m,
                      COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
    do = tl.load(DO + row, mask=md_ok, other=0.0).to(dtype).to(mm)
    lse = tl.load(LSE + pid * NQ + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid * NQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    pk_base = PK + b * sp_b + n * sp_n + g * sp_g
    pv_base = PV + b * sp_b + n * sp_n + g * sp_g
    for start in range(0, plen, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < plen
        k = _load_rotated(pk_base, offs_n, n_ok, sp_t, offs_n, COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
        v = tl.load(pv_base + offs_n[:, None] * sp_t + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(n_ok[None, :] & m_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype).to(mm), k, input_precision=PREC)

    k_base = K + b * sk_b + n * sk_n + g * sk_g
    v_base = V + b * sk_b + n * sk_n + g * sk_g
    hi = tl.minimum(q_offset + (pid_m + 1) * BLOCK_M, klen)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        k = _load_rotated(k_base, offs_n, n_ok, sk_t, plen + offs_n, COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
        v = tl.load(v_base + offs_n[:, None] * sk_t + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(mm)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= (q_offset + offs_m)[:, None]) & m_ok[:, None]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype).to(mm), k, input_precision=PREC)

    tl.store(DQ + row, dq * sm_scale, mask=md_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, KX, VX, PLEN, COS, SIN, DO, LSE, DELTA, DKX, DVX,
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
    b = pid // (G * N)
    dtype = Q.dtype.element_ty
    mm = tl.float32 if UPCAST else dtype  # the interpreter's bf16/fp16 dot is wrong: fp32 operands
    plen = tl.load(PLEN + n * G + g)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    sw_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    x_base = b * sx_b + n * sx_n + g * sx_g
    if IS_PREFIX:
        n_ok = offs_n < plen
        kpos = offs_n
        q_lo = 0
        q_hi = tl.where(pid_n * BLOCK_N < plen, NQ, 0)
    else:
        n_ok = offs_n < XLEN
        kpos = plen + offs_n
        q_lo = (tl.maximum(pid_n * BLOCK_N - q_offset, 0) // BLOCK_M) * BLOCK_M
        q_hi = NQ
    k = _load_rotated(KX + x_base, offs_n, n_ok, sx_t, kpos, COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
    nd_ok = n_ok[:, None] & (offs_d < D)[None, :]
    v = tl.load(VX + x_base + offs_n[:, None] * sx_t + offs_d[None, :], mask=nd_ok, other=0.0).to(mm)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for hh in range(HPG):
        h = g * HPG + hh
        bnh = (b * N + n) * H + h
        q_base = Q + b * sq_b + n * sq_n + h * sq_h
        for m0 in range(q_lo, q_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < NQ
            md_ok = m_ok[:, None] & (offs_d < D)[None, :]
            q = _load_rotated(q_base, offs_m, m_ok, sq_t, plen + q_offset + offs_m,
                              COS, SIN, offs_d, sw_d, sign, D).to(dtype).to(mm)
            do = tl.load(DO + b * sq_b + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                         mask=md_ok, other=0.0).to(dtype).to(mm)
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

    out = x_base + offs_n[:, None] * sx_t + offs_d[None, :]
    store_ok = (offs_n < XLEN)[:, None] & (offs_d < D)[None, :]
    tl.store(DKX + out, dk * sm_scale, mask=store_ok)
    tl.store(DVX + out, dv, mask=store_ok)


# ----------------------------------------------------------------------------------------
def _blocks(device: torch.device, head_dim: int) -> dict:
    """Block sizes and launch options; tiny blocks under the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "launch": {}}
    if head_dim <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "launch": {"num_warps": 4, "num_stages": 3}}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "launch": {"num_warps": 4, "num_stages": 2}}


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _unrotate(dx: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. un-rotated x from the gradient w.r.t. rotated x [.., D] at ``pos``
    (broadcastable to dx.shape[:-1]): the transpose of x*cos + rotate_half(x)*sin."""
    c, s = cos[pos], sin[pos]
    d1, d2 = dx.chunk(2, dim=-1)
    rot = torch.cat((-d2, d1), dim=-1)
    return dx * c - rot * s


class _SegmentedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, plen, q_offset, cos, sin):
        B, N, Q, H, D = q.shape
        G = k.shape[3]
        P = 0 if pk is None else pk.shape[2]
        cfg = _blocks(q.device, D)
        pk_ = pk if P else k  # never read when P == 0
        pv_ = pv if P else v
        o = torch.empty_like(q)
        lse = torch.empty(B, N, H, Q, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(Q, cfg["BLOCK_M"]), B * N * H)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        _fwd_kernel[grid](
            q, k, v, pk_, pv_, plen, cos, sin, o, lse,
            *_strides(q), *_strides(k), *_strides(pk_),
            N, H, G, Q, q_offset, _LOG2E / math.sqrt(D),
            HPG=H // G, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec, UPCAST=q.device.type != "cuda",
            **cfg["launch"],
        )
        ctx.save_for_backward(q, k, v, pk_, pv_, plen, cos, sin, o, lse)
        ctx.q_offset, ctx.has_prefix, ctx.prec = q_offset, bool(P), prec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, plen, cos, sin, o, lse = ctx.saved_tensors
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
            q, k, v, pk, pv, plen, cos, sin, do, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(pk),
            N, H, G, Q, q_offset, qk_scale, sm_scale, **common,
        )
        dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.empty(v.shape, device=v.device, dtype=torch.float32)
        _bwd_dkdv_kernel[(triton.cdiv(K, cfg["BLOCK_N"]), B * N * G)](
            q, k, v, plen, cos, sin, do, lse, delta, dk, dv,
            *_strides(q), *_strides(k),
            N, H, G, Q, q_offset, qk_scale, sm_scale, K, IS_PREFIX=False, **common,
        )
        dpk = dpv = None
        if P:
            dpk = torch.empty(pk.shape, device=pk.device, dtype=torch.float32)
            dpv = torch.empty(pv.shape, device=pv.device, dtype=torch.float32)
            _bwd_dkdv_kernel[(triton.cdiv(P, cfg["BLOCK_N"]), B * N * G)](
                q, pk, pv, plen, cos, sin, do, lse, delta, dpk, dpv,
                *_strides(q), *_strides(pk),
                N, H, G, Q, q_offset, qk_scale, sm_scale, P, IS_PREFIX=True, **common,
            )

        # Inverse RoPE on the gradients of the rotated operands (per-group positions).
        plen_l = plen.long()
        plen_h = plen_l.repeat_interleave(hpg, dim=1)  # [N, H]
        q_pos = plen_h[:, None, :] + q_offset + torch.arange(Q, device=q.device)[None, :, None]  # [N, Q, H]
        k_pos = plen_l[:, None, :] + torch.arange(K, device=q.device)[None, :, None]  # [N, K, G]
        dq = _unrotate(dq, q_pos, cos, sin).to(q.dtype)
        dk = _unrotate(dk, k_pos, cos, sin).to(k.dtype)
        dv = dv.to(v.dtype)
        if P:
            p_pos = torch.arange(P, device=q.device)[:, None]  # [P, 1]
            dpk = _unrotate(dpk, p_pos, cos, sin).to(pk.dtype)
            dpv = dpv.to(pv.dtype)
        return dq, dk, dv, dpk, dpv, None, None, None, None


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
