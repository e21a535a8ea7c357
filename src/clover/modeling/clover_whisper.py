"""Whisper with pruned attention: per-layer Q-K and V-O head widths for each of its three kinds of block.

This file imports only torch and transformers on purpose: clover copies it next to a pruned checkpoint, so
``AutoModelForSpeechSeq2Seq.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Six per-layer lists replace the head size: ``encoder_qk_dims`` / ``encoder_vo_dims`` (encoder self-attention),
``decoder_qk_dims`` / ``decoder_vo_dims`` (decoder self-attention) and ``cross_qk_dims`` / ``cross_vo_dims``
(decoder cross-attention over the encoder output). ``q_proj``/``k_proj`` are ``Linear(d_model, H*qk)``,
``v_proj`` is ``Linear(d_model, H*vo)`` and ``out_proj`` is ``Linear(H*vo, d_model)``.

Whisper multiplies q by ``scaling`` right after ``q_proj``; it stays ``1/sqrt(original head size)``: pruning
removes directions that contributed little to the score, it does not rescale the rest. The decoder's cache
(``EncoderDecoderCache``) holds the smaller K and V, both per generated token (self-attention) and per encoder
position (cross-attention), so ``generate()`` works unchanged.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import WhisperConfig
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import (
    WhisperAttention,
    WhisperForConditionalGeneration,
    WhisperModel,
    WhisperPreTrainedModel,
    eager_attention_forward,
)



def _dims(values, n: int, default: int, name: str) -> list[int]:
    if values is None:
        return [default] * n
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per layer ({n})")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")
    return values


@strict
class CloverWhisperConfig(WhisperConfig):
    model_type = "clover_whisper"
    encoder_qk_dims: list[int] | None = None
    encoder_vo_dims: list[int] | None = None
    decoder_qk_dims: list[int] | None = None
    decoder_vo_dims: list[int] | None = None
    cross_qk_dims: list[int] | None = None
    cross_vo_dims: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        enc, dec = self.encoder_layers, self.decoder_layers
        enc_head = self.d_model // self.encoder_attention_heads
        dec_head = self.d_model // self.decoder_attention_heads
        self.encoder_qk_dims = _dims(self.encoder_qk_dims, enc, enc_head, "encoder_qk_dims")
        self.encoder_vo_dims = _dims(self.encoder_vo_dims, enc, enc_head, "encoder_vo_dims")
        self.decoder_qk_dims = _dims(self.decoder_qk_dims, dec, dec_head, "decoder_qk_dims")
        self.decoder_vo_dims = _dims(self.decoder_vo_dims, dec, dec_head, "decoder_vo_dims")
        self.cross_qk_dims = _dims(self.cross_qk_dims, dec, dec_head, "cross_qk_dims")
        self.cross_vo_dims = _dims(self.cross_vo_dims, dec, dec_head, "cross_vo_dims")


class CloverWhisperAttention(WhisperAttention):
    """WhisperAttention with ``qk_dim`` wide Q/K heads and ``vo_dim`` wide V heads; ``scaling`` is the original."""

    def __init__(self, original: WhisperAttention, qk_dim: int, vo_dim: int, bias: bool = True):
        super().__init__(original.embed_dim, original.num_heads, dropout=original.dropout,
                         is_decoder=original.is_decoder, bias=bias, is_causal=original.is_causal,
                         layer_idx=original.layer_idx, config=original.config)
        self.qk_dim, self.vo_dim = qk_dim, vo_dim
        heads, width = self.num_heads, self.embed_dim
        self.k_proj = nn.Linear(width, heads * qk_dim, bias=False)
        self.v_proj = nn.Linear(width, heads * vo_dim, bias=bias)
        self.q_proj = nn.Linear(width, heads * qk_dim, bias=bias)
        self.out_proj = nn.Linear(heads * vo_dim, width, bias=bias)

    def forward(self, hidden_states, key_value_states=None, past_key_values=None, attention_mask=None,
                output_attentions=False, **kwargs):
        is_cross_attention = key_value_states is not None
        input_shape = hidden_states.shape[:-1]
        # Same order as Whisper: scale q right after the projection, no scaling in the attention call.
        query_states = (self.q_proj(hidden_states) * self.scaling).view(*input_shape, -1, self.qk_dim)
        query_states = query_states.transpose(1, 2).contiguous()

        is_updated = False
        if past_key_values is not None and isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            if is_cross_attention:
                past_key_values.is_updated[self.layer_idx] = True
                past_key_values = past_key_values.cross_attention_cache
            else:
                past_key_values = past_key_values.self_attention_cache

        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and past_key_values and is_updated:
            key_states = past_key_values.layers[self.layer_idx].keys
            value_states = past_key_values.layers[self.layer_idx].values
        else:
            batch = input_shape[0]
            key_states = self.k_proj(current_states).view(batch, -1, self.num_heads, self.qk_dim)
            value_states = self.v_proj(current_states).view(batch, -1, self.num_heads, self.vo_dim)
            key_states = key_states.transpose(1, 2).contiguous()
            value_states = value_states.transpose(1, 2).contiguous()
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.dropout, scaling=1.0,
            output_attentions=output_attentions, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


def _install_pruned_attention(core: WhisperModel, config: CloverWhisperConfig) -> None:
    """Swap every attention block of a freshly built WhisperModel for one at the configured widths."""
    for i, layer in enumerate(core.encoder.layers):
        layer.self_attn = CloverWhisperAttention(layer.self_attn, config.encoder_qk_dims[i],
                                                 config.encoder_vo_dims[i])
    for i, layer in enumerate(core.decoder.layers):
        layer.self_attn = CloverWhisperAttention(layer.self_attn, config.decoder_qk_dims[i],
                                                 config.decoder_vo_dims[i])
        layer.encoder_attn = CloverWhisperAttention(layer.encoder_attn, config.cross_qk_dims[i],
                                                    config.cross_vo_dims[i])


class CloverWhisperPreTrainedModel(WhisperPreTrainedModel):
    config_class = CloverWhisperConfig


class CloverWhisperModel(CloverWhisperPreTrainedModel, WhisperModel):
    def __init__(self, config: CloverWhisperConfig):
        WhisperModel.__init__(self, config)
        _install_pruned_attention(self, config)
        self.post_init()


class CloverWhisperForConditionalGeneration(CloverWhisperPreTrainedModel, WhisperForConditionalGeneration):
    def __init__(self, config: CloverWhisperConfig):
        WhisperForConditionalGeneration.__init__(self, config)
        _install_pruned_attention(self.model, config)
        self.post_init()


CLASSES = {"config": CloverWhisperConfig, "base": CloverWhisperModel,
           "speech_seq2seq": CloverWhisperForConditionalGeneration}
