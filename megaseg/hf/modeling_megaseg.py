"""Hugging Face model for a megaseg export: Llama weights, segmented attention.

Export copies this file next to the weights and registers it through ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

builds the megaseg reference modules (same parameter names as ``LlamaForCausalLM``) and
runs them with the one segmented operator; ``megaseg`` must be importable. ``forward``
without a cache is segment-by-segment prefill of the whole input (equal to the training
forward); ``generate()`` keeps a ``SegmentedCache`` (per-sequence segmented state) and
decodes token by token with `InferenceEngine.decode`, i.e. the operator's buffered
one-token decode. Left-padded batches are supported: each row's segments start at its
first real token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megaseg.hf_config import model_config_from_hf
from megaseg.inference.batch_state import BatchState
from megaseg.inference.engine import InferenceEngine
from megaseg.models.llama import LlamaModel
from megaseg.ops.norm import RMSNorm
from megaseg.ops.segmented_attention import SegmentedAttention


class MegasegLlamaConfig(LlamaConfig):
    """A Llama config plus a ``megaseg`` section: segment settings and head plan."""

    model_type = "megaseg_llama"


class SegmentedCache:
    """Generation state: the engine's per-sequence segmented state of the batch."""

    def __init__(self, state: BatchState):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.state.positions())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = self.state.select(beam_idx.tolist())


class MegasegLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegasegLlamaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _is_stateful = True

    def __init__(self, config: MegasegLlamaConfig):
        super().__init__(config)
        self.megaseg_config = model_config_from_hf(config.to_dict(), source="config.json")
        self.model = LlamaModel(self.megaseg_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.megaseg_config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the segmented state is not a KV cache; forward creates its own

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, SegmentedAttention):
            # Index maps and rotary frequencies are derived buffers, never in the weights;
            # rebuild them in case the model was created on the meta device.
            i = next(i for i, layer in enumerate(self.model.layers) if layer.self_attn.core is module)
            cfg = self.megaseg_config
            fresh = SegmentedAttention(cfg.head_plan.layer(i), cfg.segment, cfg.rope, cfg.head_dim,
                                       cfg.heads_per_group)
            for name, buf in fresh.named_buffers():
                owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                owner._buffers[name.rpartition(".")[2]] = buf.to(module_device(self))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SegmentedCache | None = None,
        past_key_values: SegmentedCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MegasegLlamaForCausalLM takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # A model trained with documents as the unit of state restarts after its EOD.
        eod = (getattr(self.config, "megaseg", None) or {}).get("document_eod")
        engine = InferenceEngine(self, self.megaseg_config, document_eod=eod)
        B, L = input_ids.shape
        last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1 and labels is None
        if cache is None:
            rows = _unpad_rows(input_ids, attention_mask)
            logits_rows, state = engine.prefill(rows, all_logits=not last_only)
            if last_only:
                logits = logits_rows[:, None]
            else:
                logits = logits_rows[0].new_zeros(B, L, self.config.vocab_size)
                for r, lg in enumerate(logits_rows):
                    logits[r, L - lg.shape[0]:] = lg
            cache = SegmentedCache(state)
        else:
            if L != 1:
                raise ValueError(f"with a cache, pass one new token per row (got {L})")
            logits = engine.decode(input_ids[:, 0], cache.state)[:, None]
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


def module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _unpad_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens; padding must be on the left (as generate() pads)."""
    if attention_mask is None or bool(attention_mask.all()):
        return list(input_ids)
    rows = []
    for r in range(input_ids.shape[0]):
        m = attention_mask[r].bool()
        n = int(m.sum())
        if n == 0 or not bool(m[-n:].all()):
            raise ValueError("attention_mask must be left padding with at least one real token per row")
        rows.append(input_ids[r, -n:])
    return rows


_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
