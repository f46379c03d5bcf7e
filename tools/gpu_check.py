"""GPU validation of megaseg on one CUDA device, in one run, with one JSON summary.

    python tools/gpu_check.py [--out gpu_check.json] [--steps 3] [--peak-tflops 989]
    python tools/gpu_check.py --smoke        # tiny shapes, any device (what CI runs on CPU)

Sections (each records its own result or error; the summary's ``targets`` collects the
pass/fail lines):

1. ``kernel`` — the fused Triton kernel against the SDPA path at a training shape (bf16,
   32 query / 8 KV heads of 64, S = 4096, prefix 512, 8 segments, local + retrieval +
   segment groups): output and gradients against an fp32 SDPA reference (the SDPA path in
   bf16 is measured the same way as the yardstick), and forward+backward time against
   PyTorch's flash SDPA on causal sequences of prefix + segment = 4608 tokens, the same
   keys per query (``ratio_to_flash``; target <= 1.2), and on one causal sequence of the
   whole length.
2. ``te_vs_local`` — the megatron-core model with the Transformer Engine layer spec against
   the local spec, same weights: logits, then one SGD training step (loss and parameter
   update). Skipped with a reason when transformer_engine does not import.
3. ``train_megaseg`` / ``train_stock`` — bf16 training steps of a ~1B-parameter Llama-shaped
   model (16 layers, hidden 2048, 32 heads, 8 KV groups, FFN 8192, vocab 32000) on one
   32K-token sequence: megaseg's TBPTT-1 pretraining step (S = 4096, M = R = 512, two of
   eight KV groups retrieve in layers 3, 6, 9, 12; pretrain_gpt.py's model, DDP and
   optimizer) next to megatron-core's stock GPT with Transformer Engine layers and flash
   full causal attention. Tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated;
   weights, gradients and Adam state included).
4. ``inference_128k`` — prefill of a 131072-token prompt through the same model shape in
   bf16 with `InferenceEngine`: peak memory with the SDPA kernel against
   `megaseg.inference.memory_model.predict_prefill_memory` (which models that path), and
   peak memory with the default kernel selection.

MFU = model FLOPs per step / (step time x peak bf16 FLOP/s). Model FLOPs count matmuls
only, forward x 3 for training (backward = 2 x forward), no recomputation:

    per token:  6 * N_matmul,   N_matmul = layers * (E*(H+2G)*D + H*D*E + 3*E*F) + E*V
    attention:  12 * layers * H * D * (sum over query tokens of the keys each attends to)

(E hidden, H query heads, G KV heads, D head dim, F FFN size, V vocabulary). Keys per query
are counted exactly: causal full attention gives T(T+1)/2 per sequence; segmented
attention gives, per KV group, (its valid prefix + position in segment + 1), averaged over
the query heads. TBPTT-K's extra backward passes through carried tails are not model FLOPs,
so they lower MFU. Peak FLOP/s defaults to the dense bf16 figure of the device (H100/H200
SXM: 989 TFLOP/s; A100: 312) or ``--peak-tflops``.

This script has not yet been run on a GPU: its numbers and targets are unverified.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megaseg.config import LOCAL, SEGMENT, ModelConfig  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s, by device name fragment (first match wins).
PEAK_BF16_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))

KERNEL_TARGET = 1.2
MFU_TARGET = 0.35
BF16_FWD_TOL, BF16_GRAD_TOL = 4e-2, 3e-2


# ---- FLOPs -------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: projections, MLP and the LM head
    (embedding lookup and norms excluded)."""
    E, H, G, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = E * (H + 2 * G) * D + H * D * E + 3 * E * F
    return cfg.num_layers * per_layer + E * cfg.vocab_size


def segmented_keys_per_query(cfg: ModelConfig, layer: int, T: int) -> float:
    """Sum over the T query tokens of one sequence of the keys each attends to in ``layer``,
    averaged over the layer's query heads (docs/semantics.md §2: prefix of the group's mode + the
    segment causally)."""
    S, M, R = cfg.segment.segment_length, cfg.segment.tail_length, cfg.segment.retrieval_length
    modes = cfg.head_plan.layer(layer) if cfg.head_plan is not None else (LOCAL,) * cfg.num_kv_heads
    total = 0
    for start in range(0, T, S):
        n = min(S, T - start)
        closed_before = start  # tokens in earlier segments
        causal = n * (n + 1) // 2
        for mode in modes:
            if start == 0 or mode == SEGMENT:
                prefix = 0
            elif mode == LOCAL:
                prefix = min(M, S)
            else:
                prefix = min(R, closed_before)
            total += causal + n * prefix
    return total / len(modes)


def training_flops(cfg: ModelConfig, T: int, batch: int = 1, attention: str = "segmented") -> float:
    """Model FLOPs of one training step (forward + backward) on ``batch`` sequences of T tokens."""
    per_token = 6 * matmul_params(cfg)
    hd = cfg.num_heads * cfg.head_dim
    if attention == "full":
        keys = cfg.num_layers * T * (T + 1) / 2
    elif attention == "segmented":
        keys = sum(segmented_keys_per_query(cfg, layer, T) for layer in range(cfg.num_layers))
    else:
        raise ValueError(f"attention={attention!r}: 'segmented' or 'full'")
    return batch * (per_token * T + 12 * hd * keys)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return tflops
    return None


# ---- TE <-> local weights -------------------------------------------------------------------
def te_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Local-spec parameter name fragment -> Transformer Engine spec name fragment, taken
    from the local spec's own ``sharded_state_dict_keys_map`` (the map that makes the two
    specs' checkpoints interchangeable)."""
    from megaseg.megatron.layer_spec import get_segmented_layer_local_spec

    return dict(get_segmented_layer_local_spec(cfg).submodules.sharded_state_dict_keys_map)


def te_name(key: str, mapping: dict[str, str]) -> str:
    """The TE-spec name of a local-spec GPTModel parameter ``key``."""
    if key.startswith("decoder.layers."):
        for src, dst in mapping.items():
            if "." + src in key:
                return key.replace("." + src, "." + dst, 1)
    return key


def local_to_te_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """A local-spec GPTModel state dict renamed for the TE-spec model (the layers' norm
    weights move into the fused norm+linear modules; everything else keeps its name)."""
    mapping = te_key_map(cfg)
    return {te_name(key, mapping): value for key, value in state.items()}


# ---- timing / memory ----------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup=1, repeats=3) -> float:
    """Median wall seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- shapes ---------------------------------------------------------------------------------
def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(layers=2, hidden=64, heads=4, groups=2, ffn=128, vocab=256, S=16, M=4, R=4, T=64,
                    long_layers=[1], long_heads=1, infer_T=96, te_T=32, kernel=dict(N=2, S=16, P=4, H=4, G=2, D=16))
    return dict(layers=16, hidden=2048, heads=32, groups=8, ffn=8192, vocab=32000, S=4096, M=512, R=512,
                T=32768, long_layers=[3, 6, 9, 12], long_heads=2, infer_T=131072, te_T=4096,
                kernel=dict(N=8, S=4096, P=512, H=32, G=8, D=64))


def pretrain_config(sh: dict, **overrides):
    from megaseg.training.arguments import PretrainConfig

    kw = dict(
        num_layers=sh["layers"], hidden_size=sh["hidden"], ffn_hidden_size=sh["ffn"],
        num_attention_heads=sh["heads"], num_query_groups=sh["groups"], vocab_size=sh["vocab"],
        segment_length=sh["S"], tail_length=sh["M"], retrieval_length=sh["R"], tbptt_k=1,
        head_plan_preset="interleaved", long_range_layers=sh["long_layers"], num_long_range_heads=sh["long_heads"],
        seq_length=sh["T"], micro_batch_size=1, global_batch_size=1, train_iters=100, lr=1e-4, min_lr=1e-5,
        lr_warmup_iters=0, optimizer="adam", bf16=None,
    )
    kw.update(overrides)
    return PretrainConfig(**kw)


# ---- 1. kernel ------------------------------------------------------------------------------
def check_kernel(sh: dict, device, dtype) -> dict:
    from megaseg.config import RopeConfig
    from megaseg.ops import kernels
    from megaseg.ops.kernels import SegmentBatch, sdpa
    from megaseg.ops.rope import Rotary

    if not kernels.triton_available():
        return {"skipped": "triton is not installed"}
    if device.type != "cuda":
        return {"skipped": "the Triton kernel runs on CUDA here (on CPU only under TRITON_INTERPRET=1, see tests)"}
    from megaseg.ops.kernels import triton_segmented

    k = sh["kernel"]
    N, S, P, H, G, D = k["N"], k["S"], k["P"], k["H"], k["G"], k["D"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    q, kk, v = make(1, N, S, H, D), make(1, N, S, G, D), make(1, N, S, G, D)
    pk, pv = make(1, N, P, G, D), make(1, N, P, G, D)
    # Groups: mostly local (full tail), one retrieval (partial prefix), one segment; segment 0 has none.
    col = [P] * (G - 2) + [P - 7, 0]
    plen = torch.tensor([[0] * G] + [col] * (N - 1), device=device)
    rot = Rotary(RopeConfig(theta=10000.0), D).to(device)
    inputs = (q, kk, v, pk, pv)
    cot = torch.randn(1, N, S, H, D, generator=gen).to(device=device, dtype=dtype)

    def run(fn, ts):
        out = fn(SegmentBatch(*ts, plen, 0), rot)
        grads = torch.autograd.grad(out, ts, cot.to(out.dtype))
        return out, grads

    ts32 = tuple(t.detach().float().requires_grad_(True) for t in inputs)
    ref, ref_g = run(sdpa.attend, ts32)
    out_t, g_t = run(triton_segmented.attend, inputs)
    out_s, g_s = run(sdpa.attend, inputs)

    def err(o, g):
        fwd = (o.float() - ref).abs().max().item()
        grad = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(g, ref_g)]
        return fwd, grad

    fwd_t, grad_t = err(out_t, g_t)
    fwd_s, grad_s = err(out_s, g_s)
    del ref, ref_g, ts32

    def fwd_bwd(fn):
        def step():
            out = fn()
            out.backward(torch.ones_like(out))
        return step

    triton_s = _time(fwd_bwd(lambda: triton_segmented.attend(SegmentBatch(*inputs, plen, 0), rot)), device)
    sdpa_s = _time(fwd_bwd(lambda: sdpa.attend(SegmentBatch(*inputs, plen, 0), rot)), device)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(L, batch):
        qf = torch.randn(batch, H, L, D, device=device, dtype=dtype, requires_grad=True)
        kf = torch.randn(batch, H, L, D, device=device, dtype=dtype, requires_grad=True)
        vf = torch.randn(batch, H, L, D, device=device, dtype=dtype, requires_grad=True)

        def call():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
        return _time(fwd_bwd(call), device)

    flash_prefix_s = flash(P + S, N)
    flash_full_s = flash(N * S, 1)
    ratio = triton_s / flash_prefix_s
    ok = (fwd_t <= BF16_FWD_TOL and max(grad_t) <= BF16_GRAD_TOL)
    return {
        "shape": dict(N=N, S=S, P=P, H=H, G=G, D=D, dtype=str(dtype)),
        "fwd_err_triton": fwd_t, "grad_rel_err_triton": grad_t,
        "fwd_err_sdpa_bf16": fwd_s, "grad_rel_err_sdpa_bf16": grad_s,
        "matches_sdpa": ok,
        "fwd_bwd_ms": {"triton": 1e3 * triton_s, "sdpa_path": 1e3 * sdpa_s,
                       "flash_causal_prefix_plus_segment": 1e3 * flash_prefix_s,
                       "flash_causal_full_length": 1e3 * flash_full_s},
        "ratio_to_flash": ratio,
    }


# ---- 2. TE vs local -------------------------------------------------------------------------
def check_te_vs_local(sh: dict, device, bf16: bool) -> dict:
    from megaseg.megatron.layer_spec import transformer_engine_available

    if not transformer_engine_available():
        return {"skipped": "transformer_engine is not importable"}
    from megaseg.megatron.model import segment_forward
    from megaseg.training.precision import autocast_context
    from megaseg.training.setup import setup_model_and_optimizer

    T = sh["te_T"]
    cfgs = {name: pretrain_config(sh, seq_length=T, use_te=use_te, optimizer="sgd", sgd_momentum=0.0, lr=1e-2,
                                  weight_decay=0.0, clip_grad=0.0, lr_decay_style="constant")
            for name, use_te in (("local", False), ("te", True))}
    model_cfg = cfgs["local"].model_config(sh["vocab"])
    local, local_opt, _ = setup_model_and_optimizer(cfgs["local"], model_cfg)
    te, te_opt, _ = setup_model_and_optimizer(cfgs["te"], model_cfg)
    state = local_to_te_state_dict(local.module.state_dict(), model_cfg)
    missing, unexpected = te.module.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        return {"error": f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}"}
    ids = torch.randint(0, sh["vocab"], (1, T), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad(), autocast_context(bf16):
        logits_l, _ = segment_forward(local, ids)
        logits_t, _ = segment_forward(te, ids)
    logit_err = ((logits_l.float() - logits_t.float()).abs().max() / logits_l.float().abs().max()).item()

    from megaseg.training.engines import select_engine, train_step

    mapping = te_key_map(model_cfg)
    local_params, te_params = dict(local.module.named_parameters()), dict(te.module.named_parameters())
    before = {n: p.detach().float().clone() for n, p in local_params.items()}
    batch = [(ids, ids)]
    m_local = train_step(select_engine(cfgs["local"], local, bf16), local_opt, _DummyScheduler(), batch)
    m_te = train_step(select_engine(cfgs["te"], te, bf16), te_opt, _DummyScheduler(), batch)
    num = den = 0.0
    for name, p0 in before.items():
        d_local = local_params[name].detach().float() - p0
        d_te = te_params[te_name(name, mapping)].detach().float() - p0
        num = max(num, (d_local - d_te).abs().max().item())
        den = max(den, d_local.abs().max().item())
    update_err = num / max(den, 1e-30)
    return {
        "T": T, "logits_rel_err": logit_err, "loss_local": m_local.loss, "loss_te": m_te.loss,
        "update_rel_err": update_err,
        "matches": logit_err <= 2e-2 and abs(m_local.loss - m_te.loss) <= 2e-2 and update_err <= 5e-2,
    }


class _DummyScheduler:
    """Stands in for the LR scheduler where a check runs one step at a fixed rate."""

    def step(self, increment):
        pass


# ---- 3. training throughput ----------------------------------------------------------------
def train_megaseg(sh: dict, device, bf16: bool, steps: int, peak: float | None) -> dict:
    from megaseg.training.engines import select_engine, train_step
    from megaseg.training.setup import setup_model_and_optimizer

    cfg = pretrain_config(sh)
    model_cfg = cfg.model_config(sh["vocab"])
    _reset_peak(device)
    model, opt, sched = setup_model_and_optimizer(cfg, model_cfg)
    engine = select_engine(cfg, model, bf16)
    ids = torch.randint(0, sh["vocab"], (1, sh["T"]), generator=torch.Generator().manual_seed(1)).to(device)
    batch = [(ids, ids)]
    losses = []
    step_s = _time(lambda: losses.append(train_step(engine, opt, sched, batch).loss), device,
                   warmup=1, repeats=steps)
    flops = training_flops(model_cfg, sh["T"], attention="segmented")
    out = _throughput(sh["T"], step_s, flops, peak, device)
    out.update(params=sum(p.numel() for p in model.parameters()), losses=losses)
    del model, opt, sched, engine
    return out


def train_stock(sh: dict, device, bf16: bool, steps: int, peak: float | None, smoke: bool = False) -> dict:
    """megatron-core's GPT with its Transformer Engine layer spec (flash/fused causal
    attention over the whole sequence), same shape, same DDP/optimizer settings. Without
    TE only a smoke run goes on, with megatron's local spec (unfused attention)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megaseg.megatron.layer_spec import transformer_engine_available

    if transformer_engine_available():
        layer_spec, spec_name = get_gpt_layer_with_transformer_engine_spec(), "transformer_engine"
    elif smoke:
        layer_spec, spec_name = get_gpt_layer_local_spec(normalization="RMSNorm"), "local"
    else:
        return {"skipped": "transformer_engine is not importable (megatron's stock full-attention GPT needs it)"}
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megaseg.megatron.model import transformer_config_from
    from megaseg.training.precision import autocast_context
    from megaseg.training.setup import seed_everything

    cfg = pretrain_config(sh)
    model_cfg = cfg.model_config(sh["vocab"])
    seed_everything(cfg.seed)
    _reset_peak(device)
    config = transformer_config_from(model_cfg, params_dtype=torch.float32)
    gpt = GPTModel(config=config, transformer_layer_spec=layer_spec,
                   vocab_size=sh["vocab"], max_sequence_length=sh["T"], position_embedding_type="rope",
                   rotary_base=int(cfg.rotary_base), share_embeddings_and_output_weights=False).to(device)
    model = DistributedDataParallel(config=gpt.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    module=gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                 clip_grad=cfg.clip_grad, params_dtype=torch.float32), [model])
    ids = torch.randint(0, sh["vocab"], (1, sh["T"]), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.arange(sh["T"], device=device)[None]
    losses = []

    def step():
        model.zero_grad_buffer()
        opt.zero_grad()
        with autocast_context(bf16):
            loss = model(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        finalize_model_grads([model])
        opt.step()
        losses.append(loss.item())

    step_s = _time(step, device, warmup=1, repeats=steps)
    flops = training_flops(model_cfg, sh["T"], attention="full")
    out = _throughput(sh["T"], step_s, flops, peak, device)
    out.update(params=sum(p.numel() for p in gpt.parameters()), losses=losses, layer_spec=spec_name)
    del model, opt, gpt
    return out


def _throughput(T, step_s, flops, peak, device) -> dict:
    return {
        "tokens": T, "step_s": step_s, "tokens_per_s": T / step_s, "model_tflops_per_step": flops / 1e12,
        "mfu": None if peak is None else flops / step_s / (peak * 1e12),
        "peak_mem_gib": _peak_gib(device),
    }


# ---- 4. inference -----------------------------------------------------------------------------
def inference_memory(sh: dict, device, dtype) -> dict:
    from megaseg.inference.engine import InferenceEngine
    from megaseg.inference.memory_model import predict_prefill_memory
    from megaseg.models.llama import SegmentedLlamaForCausalLM
    from megaseg.ops import kernels

    cfg = pretrain_config(sh).model_config(sh["vocab"])
    T = sh["infer_T"]
    with torch.device(device):
        model = SegmentedLlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    ids = torch.randint(0, sh["vocab"], (T,), generator=torch.Generator().manual_seed(2))
    out = {"T": T}
    before = kernels.get_default()
    try:
        for name in ("sdpa", "auto"):
            kernels.set_default(name)
            _reset_peak(device)
            t0 = time.perf_counter()
            InferenceEngine(model).prefill([ids])
            _sync(device)
            out[f"prefill_s_{name}"] = time.perf_counter() - t0
            out[f"peak_gib_{name}"] = _peak_gib(device)
    finally:
        kernels.set_default(before)
    pred = predict_prefill_memory(cfg, T, dtype)
    out["predicted_gib"] = pred.total / 2**30
    out["predicted_full_attention_gib"] = predict_prefill_memory(cfg, T, dtype, mode="full").total / 2**30
    if out["peak_gib_sdpa"] is not None:
        out["measured_over_predicted"] = out["peak_gib_sdpa"] / out["predicted_gib"]
    del model
    return out


# ---- driver --------------------------------------------------------------------------------------
def _section(summary: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    try:
        summary[name] = fn(*args)
    except Exception as exc:  # one failing section must not hide the others
        summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    summary[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {json.dumps(summary[name], default=str)[:400]}", file=sys.stderr, flush=True)


def targets(summary: dict) -> dict:
    k, m, s = summary.get("kernel", {}), summary.get("train_megaseg", {}), summary.get("train_stock", {})
    te = summary.get("te_vs_local", {})
    return {
        "kernel_matches_sdpa": k.get("matches_sdpa"),
        f"kernel_fwd_bwd_within_{KERNEL_TARGET}x_flash": None if "ratio_to_flash" not in k
        else k["ratio_to_flash"] <= KERNEL_TARGET,
        "te_matches_local": te.get("matches"),
        f"tbptt1_mfu_at_least_{MFU_TARGET}": None if m.get("mfu") is None else m["mfu"] >= MFU_TARGET,
        "megaseg_over_stock_tokens_per_s": None if not (m.get("tokens_per_s") and s.get("tokens_per_s"))
        else m["tokens_per_s"] / s["tokens_per_s"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model (after one warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (fp32 on CPU)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["kernel", "te_vs_local", "train_megaseg", "train_stock", "inference_128k"])
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check needs a CUDA device; --smoke runs it at tiny shapes on this machine", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    from megaseg.training.precision import bf16_supported

    bf16 = cuda and bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    sh = shapes(args.smoke)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    summary = {"device": name, "peak_bf16_tflops": peak, "dtype": str(dtype), "smoke": args.smoke,
               "torch": torch.__version__, "shapes": {k: v for k, v in sh.items() if k != "kernel"}}

    from megaseg.megatron import parallel

    t0 = time.perf_counter()
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    try:
        plan = [("kernel", check_kernel, sh, device, dtype),
                ("te_vs_local", check_te_vs_local, sh, device, bf16),
                ("train_megaseg", train_megaseg, sh, device, bf16, args.steps, peak),
                ("train_stock", train_stock, sh, device, bf16, args.steps, peak, args.smoke),
                ("inference_128k", inference_memory, sh, device, dtype)]
        for section, fn, *fn_args in plan:
            if section in args.skip:
                summary[section] = {"skipped": "--skip"}
                continue
            _section(summary, section, fn, *fn_args)
            if cuda:
                torch.cuda.empty_cache()
    finally:
        parallel.destroy_model_parallel()
    summary["targets"] = targets(summary)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
