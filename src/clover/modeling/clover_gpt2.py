"""GPT-2 with pruned attention: per-layer Q-K and V-O head widths.

This file imports only torch and transformers on purpose: clover copies it next to a pruned checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Two numbers per layer replace ``head_dim``: ``qk_dims[l]`` (width of each Q and K head) and ``vo_dims[l]`` (width
of each V head and of each head's block of ``c_proj``). The fused ``c_attn`` Conv1D then has output width
``H*qk + H*qk + H*vo`` (Q, K, V in that order); ``c_proj`` reads ``H*vo``. Cross-attention blocks
(``add_cross_attention=True``) take Q (``H*qk``) from ``q_attn`` and K, V (``H*qk + H*vo``) from ``c_attn``;
their widths are ``cross_qk_dims`` / ``cross_vo_dims``, which default to the self-attention widths of the layer.

The softmax scale stays what GPT-2 used (``1/sqrt(original head_dim)``, further divided by ``layer_idx + 1`` with
``scale_attn_by_inverse_layer_idx``): pruning removes directions that contributed little to the score, it does
not rescale the rest. The KV cache holds the smaller K and V.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GPT2Config
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
    eager_attention_forward,
)
from transformers.pytorch_utils import Conv1D


def _dims(values, n: int, default: list[int] | int, name: str) -> list[int]:
    if values is None:
        return list(default) if isinstance(default, list) else [default] * n
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per layer ({n})")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")
    return values


@strict
class CloverGPT2Config(GPT2Config):
    model_type = "clover_gpt2"
    qk_dims: list[int] | None = None
    vo_dims: list[int] | None = None
    # Cross-attention blocks (add_cross_attention=True) only; None: the same as qk_dims / vo_dims.
    cross_qk_dims: list[int] | None = None
    cross_vo_dims: list[int] | None = None
    # Hidden-sliced models (clover.slicing): the LayerNorms become RMS norms over the rotated stream that divide by
    # the original width ``norm_dim`` and skip coordinate ``norm_skip`` (it holds the stream's mean, which a
    # LayerNorm removes); their shifts and scales live in the next weights, ln_f's in a square map before the head.
    norm_dim: int | None = None
    norm_skip: int | None = None
    attn_head_dim: int | None = None  # the original head width once n_embd was sliced (it sets the softmax scale)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, head_dim = self.n_layer, self.attn_head_dim or self.n_embd // self.n_head
        self.qk_dims = _dims(self.qk_dims, n, head_dim, "qk_dims")
        self.vo_dims = _dims(self.vo_dims, n, head_dim, "vo_dims")
        self.cross_qk_dims = _dims(self.cross_qk_dims, n, self.qk_dims, "cross_qk_dims")
        self.cross_vo_dims = _dims(self.cross_vo_dims, n, self.vo_dims, "cross_vo_dims")


class CloverGPT2Attention(GPT2Attention):
    """GPT2Attention whose Q/K heads are ``qk_dim`` wide and V heads ``vo_dim`` wide; ``scaling`` is unchanged."""

    def __init__(self, config: CloverGPT2Config, is_cross_attention: bool = False, layer_idx: int | None = None):
        # GPT2Attention.__init__ would derive the head width from n_embd, which slicing changes: set its fields here.
        nn.Module.__init__(self)
        self.config, self.embed_dim, self.num_heads = config, config.hidden_size, config.num_attention_heads
        self.head_dim = config.attn_head_dim or self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention, self.layer_idx, self.is_causal = is_cross_attention, layer_idx, not is_cross_attention
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(self.layer_idx + 1)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        i = 0 if layer_idx is None else layer_idx
        if is_cross_attention:
            self.qk_dim, self.vo_dim = config.cross_qk_dims[i], config.cross_vo_dims[i]
        else:
            self.qk_dim, self.vo_dim = config.qk_dims[i], config.vo_dims[i]
        qk, vo = self.num_heads * self.qk_dim, self.num_heads * self.vo_dim
        if is_cross_attention:
            self.q_attn = Conv1D(qk, self.embed_dim)
            self.c_attn = Conv1D(qk + vo, self.embed_dim)
        else:
            self.c_attn = Conv1D(qk + qk + vo, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, vo)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        is_cross_attention = encoder_hidden_states is not None
        qk, vo = self.num_heads * self.qk_dim, self.num_heads * self.vo_dim
        is_updated = False
        if past_key_values is not None:
            if isinstance(past_key_values, EncoderDecoderCache):
                is_updated = past_key_values.is_updated.get(self.layer_idx)
                if is_cross_attention:
                    # after the first generated id, the cross-attention keys/values come from the cache
                    curr_past_key_values = past_key_values.cross_attention_cache
                else:
                    curr_past_key_values = past_key_values.self_attention_cache
            else:
                curr_past_key_values = past_key_values

        if is_cross_attention:
            if not hasattr(self, "q_attn"):
                raise ValueError(
                    "If class is used as cross attention, the weights `q_attn` have to be defined. "
                    "Please make sure to instantiate class with `CloverGPT2Attention(..., is_cross_attention=True)`."
                )
            query_states = self.q_attn(hidden_states)
            attention_mask = encoder_attention_mask
            if past_key_values is not None and is_updated:
                key_states = curr_past_key_values.layers[self.layer_idx].keys
                value_states = curr_past_key_values.layers[self.layer_idx].values
            else:
                key_states, value_states = self.c_attn(encoder_hidden_states).split([qk, vo], dim=2)
                key_states = key_states.view(*key_states.shape[:-1], -1, self.qk_dim).transpose(1, 2)
                value_states = value_states.view(*value_states.shape[:-1], -1, self.vo_dim).transpose(1, 2)
        else:
            query_states, key_states, value_states = self.c_attn(hidden_states).split([qk, qk, vo], dim=2)
            key_states = key_states.view(*key_states.shape[:-1], -1, self.qk_dim).transpose(1, 2)
            value_states = value_states.view(*value_states.shape[:-1], -1, self.vo_dim).transpose(1, 2)

        query_states = query_states.view(*query_states.shape[:-1], -1, self.qk_dim).transpose(1, 2)

        if past_key_values is not None and (not is_cross_attention or not is_updated):
            key_states, value_states = curr_past_key_values.update(key_states, value_states, self.layer_idx)
            if is_cross_attention:
                past_key_values.is_updated[self.layer_idx] = True

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            # shape-generic: Q.K^T over qk_dim, weights @ V over vo_dim, alpha=self.scaling
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query_states, key_states, value_states, attention_mask
            )
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )

        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights


class SlicedStreamNorm(nn.Module):
    """LayerNorm of a hidden-sliced GPT-2, in the rotated basis: the stream's mean sits in coordinate ``skip``, so
    centring is dropping it; the variance is over the original width ``mean_dim``. With ``project`` (``ln_f``) a
    square map with a bias follows: the original ``ln_f``'s scale and shift, rotated (the head stays tied)."""

    def __init__(self, width: int, mean_dim: int, skip: int | None, eps: float, project: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.mean_dim, self.skip, self.eps = mean_dim, skip, eps
        self.proj = nn.Linear(width, width) if project else None

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if self.skip is not None:
            h = h.index_fill(-1, torch.tensor([self.skip], device=h.device), 0.0)
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)
        h = self.weight * h.to(dtype)
        return h if self.proj is None else self.proj(h)


class CloverGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = CloverGPT2Config


class CloverGPT2Model(CloverGPT2PreTrainedModel, GPT2Model):
    def __init__(self, config: CloverGPT2Config):
        GPT2Model.__init__(self, config)
        for i, block in enumerate(self.h):
            block.attn = CloverGPT2Attention(config, layer_idx=i)
            if hasattr(block, "crossattention"):
                block.crossattention = CloverGPT2Attention(config, is_cross_attention=True, layer_idx=i)
            if config.norm_dim is not None:
                block.ln_1, block.ln_2 = (SlicedStreamNorm(config.n_embd, config.norm_dim, config.norm_skip,
                                                           config.layer_norm_epsilon) for _ in range(2))
        if config.norm_dim is not None:
            self.ln_f = SlicedStreamNorm(config.n_embd, config.norm_dim, config.norm_skip, config.layer_norm_epsilon,
                                         project=True)
        self.post_init()


class CloverGPT2LMHeadModel(CloverGPT2PreTrainedModel, GPT2LMHeadModel):
    def __init__(self, config: CloverGPT2Config):
        CloverGPT2PreTrainedModel.__init__(self, config)
        self.transformer = CloverGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


class CloverGPT2ForSequenceClassification(CloverGPT2PreTrainedModel, GPT2ForSequenceClassification):
    def __init__(self, config: CloverGPT2Config):
        CloverGPT2PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = CloverGPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()


CLASSES = {"config": CloverGPT2Config, "base": CloverGPT2Model, "causal_lm": CloverGPT2LMHeadModel,
           "sequence_classification": CloverGPT2ForSequenceClassification}
