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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, full = self.n_layer, self.n_embd
        self.k_ranks = list(self.k_ranks) if self.k_ranks is not None else [full] * n
        self.v_ranks = list(self.v_ranks) if self.v_ranks is not None else [full] * n


class CloverLatentGPT2Attention(GPT2Attention):
    def __init__(self, config: CloverLatentGPT2Config, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
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


class CloverLatentGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = CloverLatentGPT2Config


class CloverLatentGPT2Model(CloverLatentGPT2PreTrainedModel, GPT2Model):
    def __init__(self, config: CloverLatentGPT2Config):
        GPT2Model.__init__(self, config)
        for i, block in enumerate(self.h):
            block.attn = CloverLatentGPT2Attention(config, layer_idx=i)
        self.post_init()


class CloverLatentGPT2LMHeadModel(CloverLatentGPT2PreTrainedModel, GPT2LMHeadModel):
    def __init__(self, config: CloverLatentGPT2Config):
        CloverLatentGPT2PreTrainedModel.__init__(self, config)
        self.transformer = CloverLatentGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


CLASSES = {"config": CloverLatentGPT2Config, "base": CloverLatentGPT2Model, "causal_lm": CloverLatentGPT2LMHeadModel}
