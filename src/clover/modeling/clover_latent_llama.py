"""LLaMA with latent attention: the KV cache holds one shared key latent and one shared value latent per layer.

This file imports only torch and transformers on purpose: clover copies it next to a converted checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Per layer ``l`` the cache holds, for each token, ``2 * len(rope_freqs[l]) + k_ranks[l]`` key numbers and
``v_ranks[l]`` value numbers, shared by every head:

- *shared rotary components* (``k_rope``): complex mixes of the KV heads' key channels within one rotary frequency.
  RoPE turns every head's channel of frequency ``f`` by the same phase, so such a mix commutes with it: the cache
  keeps the components already rotated, and each query head reads them through ``q_rope`` (the mix is absorbed
  into the queries, as in multi-query attention). Layout: ``[real parts | imaginary parts]``, so the usual
  ``rotate_half`` rotates them with the cos/sin of ``rope_freqs``.
- *a pre-RoPE key latent* (``k_down``): keys are rebuilt from it (``k_up``) and rotated at attention time, at
  the positions of the cached tokens. RoPE is orthogonal, so a key approximated before it keeps its error after.
- *a value latent* (``v_down``): values need no rotation, so each head's up-projection is folded into its block
  of ``o_proj`` (MLA's absorption) and the heads attend over the latent itself.

Scores add over the two key parts, so a layer may use either or both. The softmax scale stays
``1/sqrt(head_dim)`` of the original model, and cos/sin always come from the model's own rotary embedding
(llama3 / yarn / linear scaling included), never from a second formula.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaRMSNorm,
    LlamaPreTrainedModel,
    eager_attention_forward,
    rotate_half,
)


@strict
class CloverLatentLlamaConfig(LlamaConfig):
    model_type = "clover_latent_llama"
    k_ranks: list[int] | None = None  # per layer: width of the pre-RoPE key latent (0: keys are shared components)
    v_ranks: list[int] | None = None  # per layer: width of the value latent
    rope_freqs: list | None = None  # per layer: the rotary frequency index of each shared key component
    qkv_bias: bool | None = None  # Qwen2 layout: biases on q, k, v but not o (None: attention_bias for all four)
    head_proj: bool = False  # sliced model with a tied head: the final norm ends in a (hidden x hidden) map

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        full = self.num_key_value_heads * self.head_dim
        self.k_ranks = list(self.k_ranks) if self.k_ranks is not None else [full] * n
        self.v_ranks = list(self.v_ranks) if self.v_ranks is not None else [full] * n
        self.rope_freqs = [list(f) for f in self.rope_freqs] if self.rope_freqs is not None else [[] for _ in range(n)]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in rotate-half layout; cos/sin (batch, seq, channels) broadcast over the head axis of x."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class CloverLatentLlamaAttention(nn.Module):
    def __init__(self, config: CloverLatentLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        # The attention functions repeat keys and values over this many query heads per KV head.
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.k_rank = config.k_ranks[layer_idx]
        self.v_rank = config.v_ranks[layer_idx]
        self.rope_freqs = list(config.rope_freqs[layer_idx])
        self.components = len(self.rope_freqs)
        if self.v_rank < 1 or self.k_rank < 0 or self.k_rank + self.components < 1:
            raise ValueError(f"layer {layer_idx}: a latent layer needs value and key dims (k_rank {self.k_rank}, "
                             f"{self.components} shared components, v_rank {self.v_rank})")
        if any(not 0 <= f < self.head_dim // 2 for f in self.rope_freqs):
            raise ValueError(f"layer {layer_idx}: rope_freqs must index the {self.head_dim // 2} rotary frequencies")
        hidden, bias = config.hidden_size, config.attention_bias
        qkv_bias = bias if config.qkv_bias is None else config.qkv_bias
        if self.components:
            self.q_rope = nn.Linear(hidden, self.num_heads * 2 * self.components, bias=qkv_bias)
            self.k_rope = nn.Linear(hidden, 2 * self.components, bias=qkv_bias)
        if self.k_rank:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
            # The latent keeps a bias even where the model has none: a low-rank fit may use the inputs' mean.
            self.k_down = nn.Linear(hidden, self.k_rank, bias=True)
            self.k_up = nn.Linear(self.k_rank, self.num_kv_heads * self.head_dim, bias=False)
        self.v_down = nn.Linear(hidden, self.v_rank, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.v_rank, hidden, bias=bias)
        self._rotary: tuple[nn.Module, ...] = ()  # the model's rotary embedding, set by the model (not a submodule)
        self._freq_index: torch.Tensor | None = None

    def _component_rotary(self, cos: torch.Tensor, sin: torch.Tensor):
        """cos/sin of every shared component: channel f of the original layout carries frequency f."""
        if self._freq_index is None or self._freq_index.device != cos.device:
            self._freq_index = torch.tensor(self.rope_freqs * 2, dtype=torch.long, device=cos.device)
        return cos[..., self._freq_index], sin[..., self._freq_index]

    def _rebuilt_keys(self, latent: torch.Tensor, query_len: int):
        """Keys of every cached token, rebuilt from the latent and rotated at their cache positions, and the
        cos/sin of the queries (the last ``query_len`` positions). Scores depend on relative positions only, so
        cache indices serve as positions (left padding shifts query and key alike)."""
        batch, _, length, _ = latent.shape
        keys = self.k_up(latent[:, 0]).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        positions = torch.arange(length, device=latent.device)[None]
        cos, sin = self._rotary[0](keys, positions)
        return rotate(keys, cos, sin), (cos[:, length - query_len:], sin[:, length - query_len:])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        batch, length, _ = hidden_states.shape
        cos, sin = position_embeddings
        cached = []
        if self.components:
            c_cos, c_sin = self._component_rotary(cos, sin)
            shared = rotate(self.k_rope(hidden_states)[:, None], c_cos, c_sin)  # (batch, 1, length, 2M)
            cached.append(shared)
        if self.k_rank:
            cached.append(self.k_down(hidden_states)[:, None])
        key_cache = torch.cat(cached, dim=-1) if len(cached) > 1 else cached[0]
        value_cache = self.v_down(hidden_states)[:, None]
        if past_key_values is not None:
            key_cache, value_cache = past_key_values.update(key_cache, value_cache, self.layer_idx)
        total = key_cache.shape[-2]
        queries, keys = [], []
        if self.components:
            q = self.q_rope(hidden_states).view(batch, length, self.num_heads, -1).transpose(1, 2)
            queries.append(rotate(q, c_cos, c_sin))
            keys.append(key_cache[..., : 2 * self.components].expand(batch, self.num_kv_heads, total, -1))
        if self.k_rank:
            rebuilt, (q_cos, q_sin) = self._rebuilt_keys(key_cache[..., 2 * self.components:], length)
            q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            queries.append(rotate(q, q_cos, q_sin))
            keys.append(rebuilt)
        query = torch.cat(queries, dim=-1) if len(queries) > 1 else queries[0]
        key = torch.cat(keys, dim=-1) if len(keys) > 1 else keys[0]
        value = value_cache.expand(batch, self.num_kv_heads, total, self.v_rank)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1).contiguous()), weights


class ProjectedRMSNorm(LlamaRMSNorm):
    """The final norm of a hidden-sliced model whose head is tied to the embedding (``clover.slicing``): the original
    final norm's scale does not commute with the rotation, so it lives in a small square map after the norm, and
    the tied table stays one tensor."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.proj(super().forward(hidden_states))


class CloverLatentLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = CloverLatentLlamaConfig


class CloverLatentLlamaModel(CloverLatentLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: CloverLatentLlamaConfig):
        LlamaModel.__init__(self, config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = CloverLatentLlamaAttention(config, i)
            layer.self_attn._rotary = (self.rotary_emb,)
        if config.head_proj:
            self.norm = ProjectedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()


class CloverLatentLlamaForCausalLM(CloverLatentLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: CloverLatentLlamaConfig):
        CloverLatentLlamaPreTrainedModel.__init__(self, config)
        self.model = CloverLatentLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


CLASSES = {"config": CloverLatentLlamaConfig, "base": CloverLatentLlamaModel,
           "causal_lm": CloverLatentLlamaForCausalLM}
