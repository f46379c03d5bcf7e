"""Pipeline-parallel TBPTT-K: every segment's loss is one pipeline micro-batch (a "window").

Forward values of segmented execution do not depend on K, and a segment's forward is a
function of its tokens and the (detached) state before it. So the L_K gradient of the loss
l_i of segment i (docs/semantics.md §5) is the plain gradient of l_i computed by a *window*:

    window i = segments max(0, i-K) .. i in ONE forward call, starting from the DETACHED
               state after segment i-K-1 (None at the start of a sequence); loss on
               segment i's tokens only; ordinary backward.

Inside one call the segmented operator carries the tails (with their gradient) from segment
to segment; the start state is detached, so exactly K boundaries are crossed. Window i's
end state (the state after segment i) is the start state of window i+K+1. Windows are
therefore independent pipeline micro-batches whose only dependency is stage-local: on each
stage the forward of window i needs that stage's own state from the forward of window
i-K-1, and megatron-core's 1F1B schedule runs the forwards of every stage in micro-batch
order. Each stage keeps its states (per global layer index, see `SegmentStates`) in a
store keyed by (data micro-batch, segment), frees an entry when the window that starts
from it runs, and sends only hidden states between stages.

Cost against the sequential engine (megaseg.training.tbptt): K extra segment forwards per
segment (K = 0: the same work). Pipeline size 1 keeps the sequential engine; this one runs
there too (megatron's no-pipelining schedule), which the tests use to check the windows
against `tbptt_backward`.

Micro-batches of the schedule: data micro-batch m (this data-parallel rank's share of the
global batch) x segment i, m-major. Windows at the start of a sequence and the last
(shorter) segment are shorter than (K+1)·S. Every stage knows each window's length from
(m, i), so activations travel in one fixed shape [(K+1)·S, B, H], zero-padded at the end
and cut back by the receiving stage: one p2p transfer per activation or gradient, where
megatron's `variable_seq_lengths` would first exchange every shape (a second blocking
round trip). `batch_p2p_comm=False`: plain isend/irecv over gloo.

Shape legend: B micro-batch, T sequence length, S segment length, L tokens of a window,
V vocabulary (unpadded), H hidden.
"""
from __future__ import annotations

import torch

from megaseg.training.batches import data_parallel_size
from megaseg.training.engines import StepEngine
from megaseg.training.losses import LossReducer, StepResult, global_predicted
from megaseg.training.precision import autocast_context
from megaseg.training.tbptt import sum_cross_entropy


def pipeline_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def stage_build_kwargs() -> dict:
    """`build_model` arguments for this rank's pipeline stage (empty without pipeline parallelism)."""
    from megatron.core import parallel_state

    if pipeline_size() == 1:
        return {}
    return dict(
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        config_overrides={"batch_p2p_comm": False},
    )


def windows(num_segments: int, k: int) -> list[tuple[int, int]]:
    """(first segment, last segment) of every window: loss on the last, gradient back K segments."""
    return [(max(0, i - k), i) for i in range(num_segments)]


def stage_state_dict(full_megatron_sd: dict, gpt) -> dict:
    """The part of a whole-model megatron state dict (one TP rank) that this pipeline stage holds,
    with layers renumbered from the stage's first layer."""
    from megaseg.megatron.model import layer_indices

    local = {g: i for i, g in enumerate(layer_indices(gpt))}
    out = {}
    for key, value in full_megatron_sd.items():
        if key.startswith("decoder.layers."):
            index, _, rest = key[len("decoder.layers."):].partition(".")
            if int(index) in local:
                out[f"decoder.layers.{local[int(index)]}.{rest}"] = value
        elif key.startswith("embedding."):
            if gpt.pre_process:
                out[key] = value
        elif gpt.post_process:  # final norm and output layer
            out[key] = value
    if gpt.post_process and not gpt.pre_process and gpt.share_embeddings_and_output_weights:
        out["output_layer.weight"] = full_megatron_sd["embedding.word_embeddings.weight"]
    return out


def _schedule(model, microbatches, cfg, bf16: bool, reducer: LossReducer, *, k: int, forward_only: bool,
              loss_scale: float) -> None:
    """Run every window of every micro-batch through megatron's schedule for this pipeline.

    The last stage adds each segment's NLL sum and label count (and the tokens) to
    ``reducer``. Without ``forward_only`` the gradient of ``loss_scale * sum_i l_i``
    accumulates in the DDP grad buffers.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import unwrap_model

    from megaseg.megatron.attention import SegmentStates
    from megaseg.megatron.model import layer_indices

    gpt = unwrap_model(model)
    layers = layer_indices(gpt)
    vocab = gpt.megaseg_config.vocab_size
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    S, T = cfg.segment_length, cfg.seq_length
    wire = (k + 1) * S  # tokens of every activation sent between stages (shorter windows are padded)
    wins = windows(-(-T // S), k)
    n_seg = len(wins)
    order = [(m, i) for m in range(len(microbatches)) for i in range(n_seg)]
    num_micro = len(order)
    store: dict[tuple[int, int], list] = {}  # (m, i) -> this stage's states after segment i

    def forward_step(data_iterator, net):
        m, i = next(data_iterator)
        first_seg, _ = wins[i]
        tokens_BT, labels_BT = microbatches[m]
        ids_BL = tokens_BT[:, first_seg * S : (i + 1) * S]
        L = ids_BL.shape[1]
        if not first:  # the schedule handed the model the padded activation: keep the window's L tokens
            gpt.decoder.set_input_tensor(gpt.decoder.input_tensor[:L])
        carrier = SegmentStates.start(layers, store.pop((m, first_seg - 1)) if first_seg > 0 else None)
        with autocast_context(bf16):
            out = net(ids_BL, position_ids=None, attention_mask=None, packed_seq_params=carrier,
                      runtime_gather_output=True)
        if i + k + 1 < n_seg:  # the start state of window i + K + 1
            store[(m, i)] = [st.detached() for st in carrier.next_states(layers)]
        if not last:  # hidden [L, B, H] -> [(K+1)·S, B, H] for the next stage, in the pipeline dtype
            return torch.nn.functional.pad(out.float(), (0, 0, 0, 0, 0, wire - L)).contiguous(), None
        labels_BL = labels_BT[:, i * S : (i + 1) * S]

        def loss_func(logits_BLV):
            loss_sum = sum_cross_entropy(logits_BLV[:, -labels_BL.shape[1] :, :vocab], labels_BL)
            reducer.add(i, loss_sum.item(), int((labels_BL != -100).sum()))
            # megatron divides the returned loss by the number of micro-batches.
            return loss_sum * (loss_scale * num_micro), {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(order),
        model=[model],
        num_microbatches=num_micro,
        seq_length=wire,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only,
    )
    store.clear()
    if last:
        reducer.add_tokens(sum(int(t.numel()) for t, _ in microbatches))


class PipelineEngine(StepEngine):
    """The windows engine: gradients of the global-batch mean NLL under TBPTT-K; the loss is
    measured on the last stage and known on every stage after the reduction."""

    name = "pipeline windows"

    def forward_backward(self, microbatches, record_stats: bool = False) -> StepResult:
        predicted = global_predicted(microbatches)
        reducer = LossReducer(self.n_segments)
        # DDP averages gradients over dp; dp / predicted makes them the global token mean.
        _schedule(self.model, microbatches, self.cfg, self.bf16, reducer, k=self.cfg.tbptt_k, forward_only=False,
                  loss_scale=data_parallel_size() / max(predicted, 1))
        return reducer.reduce(predicted)

    def _evaluate_batches(self, microbatches, reducer: LossReducer) -> None:
        """Forward only, one micro-batch per segment with the carried state (K = 0 windows)."""
        _schedule(self.model, microbatches, self.cfg, self.bf16, reducer, k=0, forward_only=True, loss_scale=1.0)
