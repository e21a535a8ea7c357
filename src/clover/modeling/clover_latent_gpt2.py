"""GPT-2 with latent attention: every head attends over one shared key latent and one shared value latent.

This file imports only torch and transformers on purpose: clover copies it next to a converted checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

GPT-2 has no rotary embeddings, so both up-projections fold into the weights (MLA's absorption): head h scores
``q_h . k_h = (x W_Q,h B_K,h^T) . c_k`` and writes ``c_v (B_V,h W_O,h)``. The fused ``c_attn`` therefore returns
``[H * k_rank query | k_rank key latent | v_rank value latent]``, ``c_proj`` reads ``H * v_rank``, and the cache
holds ``k_ranks[l] + v_ranks[l]`` numbers per token and layer, nothing per head. The softmax scale stays GPT-2's
(``1/sqrt(original head_dim)``, divided by ``layer_idx + 1`` with ``scale_attn_by_inverse_layer_idx``).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GPT2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
    eager_attention_forward,
)
from transformers.pytorch_utils import Conv1D


@strict
class CloverLatentGPT2Config(GPT2Config):
    model_type = "clover_latent_gpt2"
    k_ranks: list[int] | None = None  # per layer: width of the shared key latent
    v_ranks: list[int] | None = None  # per layer: width of the shared value latent
    # A hidden-sliced GPT-2 (clover.slicing): norms over the rotated stream that skip its mean coordinate and divide
    # by the original width, ln_f's scale and shift in a square map, and the original head width for the scale.
    norm_dim: int | None = None
    norm_skip: int | None = None
    attn_head_dim: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, full = self.n_layer, self.n_embd
        self.k_ranks = list(self.k_ranks) if self.k_ranks is not None else [full] * n
        self.v_ranks = list(self.v_ranks) if self.v_ranks is not None else [full] * n


class CloverLatentGPT2Attention(GPT2Attention):
    def __init__(self, config: CloverLatentGPT2Config, layer_idx: int):
        # GPT2Attention.__init__ would derive the head width from n_embd, which slicing changes: set its fields here.
        nn.Module.__init__(self)
        self.config, self.embed_dim, self.num_heads = config, config.hidden_size, config.num_attention_heads
        self.head_dim = config.attn_head_dim or self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention, self.layer_idx, self.is_causal = False, layer_idx, True
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(self.layer_idx + 1)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.k_rank, self.v_rank = config.k_ranks[layer_idx], config.v_ranks[layer_idx]
        if self.k_rank < 1 or self.v_rank < 1:
            raise ValueError(f"layer {layer_idx}: a latent layer needs key and value dims ({self.k_rank}, "
                             f"{self.v_rank})")
        # One latent key/value "head" serves every query head (the attention functions repeat it).
        self.num_key_value_groups = self.num_heads
        self.c_attn = Conv1D(self.num_heads * self.k_rank + self.k_rank + self.v_rank, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.num_heads * self.v_rank)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("the latent GPT-2 runtime has no cross-attention")
        batch, length, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(
            [self.num_heads * self.k_rank, self.k_rank, self.v_rank], dim=2)
        query = query.view(batch, length, self.num_heads, self.k_rank).transpose(1, 2)
        key, value = key[:, None], value[:, None]  # (batch, 1, length, rank)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            total = key.shape[-2]
            key = key.expand(batch, self.num_heads, total, self.k_rank)
            value = value.expand(batch, self.num_heads, total, self.v_rank)
            out, weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              eager_attention_forward)
            out, weights = attention(self, query, key, value, attention_mask,
                                     dropout=self.attn_dropout.p if self.training else 0.0, scaling=self.scaling,
                                     **kwargs)
        out = self.c_proj(out.reshape(batch, length, -1).contiguous())
        return self.resid_dropout(out), weights


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


class CloverLatentGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = CloverLatentGPT2Config


class CloverLatentGPT2Model(CloverLatentGPT2PreTrainedModel, GPT2Model):
    def __init__(self, config: CloverLatentGPT2Config):
        GPT2Model.__init__(self, config)
        for i, block in enumerate(self.h):
            block.attn = CloverLatentGPT2Attention(config, layer_idx=i)
            if config.norm_dim is not None:
                block.ln_1, block.ln_2 = (SlicedStreamNorm(config.n_embd, config.norm_dim, config.norm_skip,
                                                           config.layer_norm_epsilon) for _ in range(2))
        if config.norm_dim is not None:
            self.ln_f = SlicedStreamNorm(config.n_embd, config.norm_dim, config.norm_skip, config.layer_norm_epsilon,
                                         project=True)
        self.post_init()


class CloverLatentGPT2LMHeadModel(CloverLatentGPT2PreTrainedModel, GPT2LMHeadModel):
    def __init__(self, config: CloverLatentGPT2Config):
        CloverLatentGPT2PreTrainedModel.__init__(self, config)
        self.transformer = CloverLatentGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


CLASSES = {"config": CloverLatentGPT2Config, "base": CloverLatentGPT2Model, "causal_lm": CloverLatentGPT2LMHeadModel}
