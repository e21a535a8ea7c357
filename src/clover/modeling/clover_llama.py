"""LLaMA with pruned attention: per-layer Q-K and V-O head dims, and per-group kept rotary frequencies.

This file imports only torch and transformers on purpose: clover copies it next to a pruned checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Three numbers per layer replace ``head_dim``: ``qk_dims[l]`` (width of each Q and K head), ``vo_dims[l]``
(width of each V head and O block), and ``rope_pairs[l]`` (for each KV group, which rotary frequency pairs
survive; ``None`` keeps them all). The softmax scale stays ``1/sqrt(head_dim)`` of the original model:
pruning removes directions that contributed little to the score, it does not rescale the rest.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaRMSNorm,
    LlamaPreTrainedModel,
    eager_attention_forward,
    rotate_half,
)


@strict
class CloverLlamaConfig(LlamaConfig):
    model_type = "clover_llama"
    qk_dims: list[int] | None = None
    vo_dims: list[int] | None = None
    rope_pairs: list | None = None  # per layer: None, or per KV group a sorted list of kept frequency indices
    qkv_bias: bool | None = None  # Qwen2 layout: biases on q, k, v but not o (None: attention_bias for all four)
    head_proj: bool = False  # sliced model with a tied head: the final norm ends in a (hidden x hidden) map

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        self.qk_dims = list(self.qk_dims) if self.qk_dims is not None else [self.head_dim] * n
        self.vo_dims = list(self.vo_dims) if self.vo_dims is not None else [self.head_dim] * n
        self.rope_pairs = list(self.rope_pairs) if self.rope_pairs is not None else [None] * n

    def validate_architecture(self):
        """``head_dim`` is explicit here, so a hidden-sliced width need not be a multiple of the head count."""


def rope_channels(pairs: list[int], head_dim: int) -> list[int]:
    """Channels of the kept frequency pairs in rotate-half layout: pair i is channels i and i + head_dim/2."""
    return list(pairs) + [i + head_dim // 2 for i in pairs]


class CloverLlamaAttention(LlamaAttention):
    def __init__(self, config: CloverLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.qk_dim = config.qk_dims[layer_idx]
        self.vo_dim = config.vo_dims[layer_idx]
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        qkv_bias = bias if config.qkv_bias is None else config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.vo_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.vo_dim, config.hidden_size, bias=bias)
        # Kept as a list, not a buffer: it derives from the config, and loaders that build modules on the meta
        # device would leave a non-persistent buffer without data.
        pairs = config.rope_pairs[layer_idx]
        self.rope_channels = None if pairs is None else [rope_channels(p, self.head_dim) for p in pairs]
        if self.rope_channels is not None and (len(self.rope_channels), len(self.rope_channels[0])) != (
                kv_heads, self.qk_dim):
            raise ValueError(f"layer {layer_idx}: rope_pairs do not give {kv_heads} groups of {self.qk_dim} channels")
        self._rope_index: torch.Tensor | None = None

    def _rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if self.rope_channels is None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # cos/sin: (batch, seq, head_dim) -> per KV group's kept channels (batch, kv_heads, seq, qk_dim)
        if self._rope_index is None or self._rope_index.device != cos.device:
            self._rope_index = torch.tensor(self.rope_channels, dtype=torch.long, device=cos.device)
        cos_k = cos[..., self._rope_index].permute(0, 2, 1, 3)
        sin_k = sin[..., self._rope_index].permute(0, 2, 1, 3)
        groups = self.num_key_value_groups
        cos_q, sin_q = cos_k.repeat_interleave(groups, dim=1), sin_k.repeat_interleave(groups, dim=1)
        return q * cos_q + rotate_half(q) * sin_q, k * cos_k + rotate_half(k) * sin_k

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_dim).transpose(1, 2)
        q, k = self._rotary(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class ProjectedRMSNorm(LlamaRMSNorm):
    """The final norm of a hidden-sliced model whose head is tied to the embedding (``clover.slicing``): the original
    final norm's scale does not commute with the rotation, so it lives in a small square map after the norm, and
    the tied table stays one tensor."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.proj(super().forward(hidden_states))


class CloverLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = CloverLlamaConfig


class CloverLlamaModel(CloverLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: CloverLlamaConfig):
        LlamaModel.__init__(self, config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = CloverLlamaAttention(config, i)
        if config.head_proj:
            self.norm = ProjectedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()


class CloverLlamaForCausalLM(CloverLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: CloverLlamaConfig):
        CloverLlamaPreTrainedModel.__init__(self, config)
        self.model = CloverLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class CloverLlamaForSequenceClassification(CloverLlamaPreTrainedModel, LlamaForSequenceClassification):
    """The classifier layout of Llama, Mistral and Qwen2 (``model`` + ``score``, last non-pad token pooled)."""

    def __init__(self, config: CloverLlamaConfig):
        CloverLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = CloverLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


def llama_settings(config) -> dict:
    """Settings of a CloverLlamaConfig for a LLaMA-layout model: Llama itself, Mistral and Qwen2 without a sliding
    window are the same network (Qwen2 adds biases on q, k and v only). Used by clover when it prunes."""
    settings = config.to_dict()
    window = settings.get("sliding_window")
    if settings.get("use_sliding_window", settings["model_type"] == "mistral") and window is not None \
            and window < settings.get("max_position_embeddings", 0):
        raise ValueError(f"{settings['model_type']} with sliding-window attention ({window} tokens): the pruned "
                         "runtime implements full causal attention only; set sliding_window to null in the config "
                         "if your contexts never exceed the window")
    if settings["model_type"] == "qwen2":
        settings.update(qkv_bias=True, attention_bias=False)
    for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        settings.pop(key, None)
    return settings


CLASSES = {"config": CloverLlamaConfig, "base": CloverLlamaModel, "causal_lm": CloverLlamaForCausalLM,
           "sequence_classification": CloverLlamaForSequenceClassification}
