"""Mllama (LLaMA-3.2-Vision) with pruned attention: per-block Q-K and V-O head dims in each of its three stacks.

This file imports only torch and transformers on purpose: clover copies it next to a pruned checkpoint, so
``AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Where the dims live (each list has one entry per layer of its stack; ``None`` means the original head_dim):
- ``vision_config.qk_dims`` / ``vo_dims``: the local vision transformer; ``global_qk_dims`` / ``global_vo_dims``: the
  gated global transformer. Plain multi-head attention, so both widths can shrink.
- ``text_config.qk_dims`` / ``vo_dims`` / ``rope_pairs``: one entry per text layer, whichever attention it holds.
  Self-attention layers keep, per KV group, the rotary frequency pairs listed in ``rope_pairs`` (``None``: all).
  Cross-attention layers normalise each q and k head with an RMSNorm over its full width (``q_norm``/``k_norm``),
  so their Q-K width must stay ``head_dim``; their V-O width (the vision values they cache) can shrink.

The softmax scale stays ``1/sqrt(head_dim)`` of the original model: pruning removes directions that contributed
little to the score, it does not rescale the rest. The KV cache holds the smaller K and V.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mllama.configuration_mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from transformers.models.mllama.modeling_mllama import (
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaPreTrainedModel,
    MllamaTextCrossAttention,
    MllamaTextSelfAttention,
    MllamaVisionAttention,
    eager_attention_forward,
    rotate_half,
)



def _dims(values, n: int, default: int, name: str) -> list[int]:
    if values is None:
        return [default] * n
    values = [default if v is None else int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per layer ({n})")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")
    return values


@strict
class CloverMllamaVisionConfig(MllamaVisionConfig):
    model_type = "clover_mllama_vision_model"
    qk_dims: list[int] | None = None
    vo_dims: list[int] | None = None
    global_qk_dims: list[int] | None = None
    global_vo_dims: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        head_dim = self.hidden_size // self.attention_heads
        self.qk_dims = _dims(self.qk_dims, self.num_hidden_layers, head_dim, "qk_dims")
        self.vo_dims = _dims(self.vo_dims, self.num_hidden_layers, head_dim, "vo_dims")
        self.global_qk_dims = _dims(self.global_qk_dims, self.num_global_layers, head_dim, "global_qk_dims")
        self.global_vo_dims = _dims(self.global_vo_dims, self.num_global_layers, head_dim, "global_vo_dims")


@strict
class CloverMllamaTextConfig(MllamaTextConfig):
    model_type = "clover_mllama_text_model"
    qk_dims: list[int] | None = None
    vo_dims: list[int] | None = None
    rope_pairs: list | None = None  # per layer: None, or per KV group a sorted list of kept frequency indices

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, head_dim = self.num_hidden_layers, self.hidden_size // self.num_attention_heads
        self.qk_dims = _dims(self.qk_dims, n, head_dim, "qk_dims")
        self.vo_dims = _dims(self.vo_dims, n, head_dim, "vo_dims")
        self.rope_pairs = list(self.rope_pairs) if self.rope_pairs is not None else [None] * n
        for i in self.cross_attention_layers:
            if self.qk_dims[i] != head_dim:
                raise ValueError(f"layer {i} is a cross-attention layer: q_norm/k_norm need its Q-K width to stay "
                                 f"{head_dim}, got {self.qk_dims[i]}")


@strict
class CloverMllamaConfig(MllamaConfig):
    model_type = "clover_mllama"
    sub_configs_defaults = {"text_config": CloverMllamaTextConfig, "vision_config": CloverMllamaVisionConfig}


def _attention(module: nn.Module):
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


class CloverMllamaVisionAttention(MllamaVisionAttention):
    """Vision self-attention with ``qk_dim``-wide Q/K heads and ``vo_dim``-wide V heads; ``scaling`` unchanged."""

    def __init__(self, config: CloverMllamaVisionConfig, qk_dim: int, vo_dim: int):
        super().__init__(config)
        self.qk_dim, self.vo_dim = qk_dim, vo_dim
        self.q_proj = nn.Linear(self.embed_dim, self.num_heads * qk_dim, bias=False)
        self.k_proj = nn.Linear(self.embed_dim, self.num_heads * qk_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, self.num_heads * vo_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * vo_dim, self.embed_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, -1, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.vo_dim).transpose(1, 2)
        out, weights = _attention(self)(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights


def rope_channels(pairs: list[int], head_dim: int) -> list[int]:
    """Channels of the kept frequency pairs in rotate-half layout: pair i is channels i and i + head_dim/2."""
    return list(pairs) + [i + head_dim // 2 for i in pairs]


class CloverMllamaTextSelfAttention(MllamaTextSelfAttention):
    """Rotary self-attention with per-layer widths and, per KV group, a subset of rotary frequency pairs."""

    def __init__(self, config: CloverMllamaTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.qk_dim, self.vo_dim = config.qk_dims[layer_idx], config.vo_dims[layer_idx]
        heads, kv_heads = self.num_heads, self.num_key_value_heads
        self.q_proj = nn.Linear(self.hidden_size, heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, kv_heads * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, kv_heads * self.vo_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.vo_dim, self.hidden_size, bias=False)
        # A list, not a buffer: it derives from the config, and meta-device loading would leave a buffer empty.
        pairs = config.rope_pairs[layer_idx]
        self.rope_channels = None if pairs is None else [rope_channels(p, self.head_dim) for p in pairs]
        if self.rope_channels is None and self.qk_dim != self.head_dim:
            raise ValueError(f"layer {layer_idx}: a Q-K width of {self.qk_dim} needs rope_pairs saying which rotary "
                             "frequencies it keeps")
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

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_values=None, **kwargs):
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, -1, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.vo_dim).transpose(1, 2)
        q, k = self._rotary(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out, weights = _attention(self)(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                        self.dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights


class CloverMllamaTextCrossAttention(MllamaTextCrossAttention):
    """Cross-attention to the vision states with ``vo_dim``-wide V heads (Q-K keeps head_dim for q_norm/k_norm)."""

    def __init__(self, config: CloverMllamaTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.vo_dim = config.vo_dims[layer_idx]
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.vo_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.vo_dim, self.hidden_size, bias=False)

    def forward(self, hidden_states, cross_attention_states=None, past_key_values=None, attention_mask=None,
                use_cache=None, **kwargs):
        batch, seq, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2))
        if cross_attention_states is not None:
            k = self.k_proj(cross_attention_states).view(batch, -1, self.num_key_value_heads, self.head_dim)
            v = self.v_proj(cross_attention_states).view(batch, -1, self.num_key_value_heads, self.vo_dim)
            k, v = self.k_norm(k.transpose(1, 2)), v.transpose(1, 2)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
        else:  # the text model skips this layer when nothing is cached, so the cache exists here
            k, v = past_key_values.layers[self.layer_idx].keys, past_key_values.layers[self.layer_idx].values
        out, weights = _attention(self)(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                        self.dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights


def _swap_attention(model: MllamaModel, config: CloverMllamaConfig) -> None:
    """Replace every stock attention block with its pruned-width counterpart (weights are loaded afterwards)."""
    vision, text = config.vision_config, config.text_config
    for i, layer in enumerate(model.vision_model.transformer.layers):
        layer.self_attn = CloverMllamaVisionAttention(vision, vision.qk_dims[i], vision.vo_dims[i])
    for i, layer in enumerate(model.vision_model.global_transformer.layers):
        layer.self_attn = CloverMllamaVisionAttention(vision, vision.global_qk_dims[i], vision.global_vo_dims[i])
    for i, layer in enumerate(model.language_model.layers):
        if i in text.cross_attention_layers:
            layer.cross_attn = CloverMllamaTextCrossAttention(text, i)
        else:
            layer.self_attn = CloverMllamaTextSelfAttention(text, i)


class CloverMllamaPreTrainedModel(MllamaPreTrainedModel):
    config_class = CloverMllamaConfig


class CloverMllamaModel(CloverMllamaPreTrainedModel, MllamaModel):
    def __init__(self, config: CloverMllamaConfig):
        MllamaModel.__init__(self, config)
        _swap_attention(self, config)
        self.post_init()


class CloverMllamaForConditionalGeneration(CloverMllamaPreTrainedModel, MllamaForConditionalGeneration):
    def __init__(self, config: CloverMllamaConfig):
        CloverMllamaPreTrainedModel.__init__(self, config)
        self.model = CloverMllamaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def _site_slot(name: str) -> tuple[str, int, str]:
    """``(stack, layer, attention)`` of an attention module's name: ``...vision_model.<stack>.layers.<i>.self_attn``
    or ``...language_model.layers.<i>.<self_attn|cross_attn>`` (stack ``text``)."""
    parts = name.split(".")
    try:
        if "vision_model" in parts:
            at = parts.index("vision_model")
            stack, layers, index, attn = parts[at + 1:]
        else:
            at = parts.index("language_model")
            stack, (layers, index, attn) = "text", parts[at + 1:]
        if layers != "layers" or stack not in ("transformer", "global_transformer", "text"):
            raise ValueError
        return stack, int(index), attn
    except ValueError:
        raise ValueError(f"{name!r} is not an attention block of an Mllama model") from None

_NOT_SETTINGS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config")


def pruned_config(config: MllamaConfig, layers) -> CloverMllamaConfig:
    """The config of a pruned copy of ``config``'s model. ``layers``: objects with ``site`` (the attention
    module's name in the model), ``qk_dim``, ``vo_dim`` and ``rope_pairs``; blocks not listed keep their widths."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_SETTINGS}
    vision = {k: v for k, v in settings["vision_config"].items() if k not in _NOT_SETTINGS}
    text = {k: v for k, v in settings["text_config"].items() if k not in _NOT_SETTINGS}
    vision_head = vision["hidden_size"] // vision["attention_heads"]
    text_head = text["hidden_size"] // text["num_attention_heads"]
    dims = {
        "transformer": [_dims(vision.get("qk_dims"), vision["num_hidden_layers"], vision_head, "qk_dims"),
                        _dims(vision.get("vo_dims"), vision["num_hidden_layers"], vision_head, "vo_dims")],
        "global_transformer": [
            _dims(vision.get("global_qk_dims"), vision["num_global_layers"], vision_head, "global_qk_dims"),
            _dims(vision.get("global_vo_dims"), vision["num_global_layers"], vision_head, "global_vo_dims")],
        "text": [_dims(text.get("qk_dims"), text["num_hidden_layers"], text_head, "qk_dims"),
                 _dims(text.get("vo_dims"), text["num_hidden_layers"], text_head, "vo_dims")],
    }
    rope = list(text.get("rope_pairs") or [None] * text["num_hidden_layers"])
    for lr in layers:
        stack, index, attn = _site_slot(lr.site)
        if stack == "text" and attn == "self_attn":
            rope[index] = lr.rope_pairs
        dims[stack][0][index], dims[stack][1][index] = lr.qk_dim, lr.vo_dim
    vision.update(qk_dims=dims["transformer"][0], vo_dims=dims["transformer"][1],
                  global_qk_dims=dims["global_transformer"][0], global_vo_dims=dims["global_transformer"][1])
    text.update(qk_dims=dims["text"][0], vo_dims=dims["text"][1], rope_pairs=rope)
    settings.update(vision_config=CloverMllamaVisionConfig(**vision), text_config=CloverMllamaTextConfig(**text))
    return CloverMllamaConfig(**settings)


CLASSES = {"config": CloverMllamaConfig, "base": CloverMllamaModel,
           "image_text_to_text": CloverMllamaForConditionalGeneration}
