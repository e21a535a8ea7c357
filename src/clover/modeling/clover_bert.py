"""BERT with pruned attention: per-layer Q-K and V-O head widths.

This file imports only torch and transformers on purpose: clover copies it next to a pruned checkpoint, so
``AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)`` works where clover is not installed.

Two numbers per layer replace the head size: ``qk_dims[l]`` (width of each query and key head) and ``vo_dims[l]``
(width of each value head and of each head's block of ``attention.output.dense``). ``query``/``key`` are
``Linear(hidden, H*qk)``, ``value`` is ``Linear(hidden, H*vo)`` and the output ``dense`` is ``Linear(H*vo, hidden)``.
Cross-attention blocks of a BERT decoder (``add_cross_attention=True``) use ``cross_qk_dims`` / ``cross_vo_dims``,
which default to the self-attention widths of the layer.

The softmax scale stays ``1/sqrt(original head size)``: pruning removes directions that contributed little to
the score, it does not rescale the rest. A decoder's KV cache holds the smaller K and V.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertOnlyMLMHead,
    BertPreTrainedModel,
    BertSelfAttention,
    eager_attention_forward,
)


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
class CloverBertConfig(BertConfig):
    model_type = "clover_bert"
    qk_dims: list[int] | None = None
    vo_dims: list[int] | None = None
    # Cross-attention blocks (add_cross_attention=True) only; None: the same as qk_dims / vo_dims.
    cross_qk_dims: list[int] | None = None
    cross_vo_dims: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, head_dim = self.num_hidden_layers, self.hidden_size // self.num_attention_heads
        self.qk_dims = _dims(self.qk_dims, n, head_dim, "qk_dims")
        self.vo_dims = _dims(self.vo_dims, n, head_dim, "vo_dims")
        self.cross_qk_dims = _dims(self.cross_qk_dims, n, self.qk_dims, "cross_qk_dims")
        self.cross_vo_dims = _dims(self.cross_vo_dims, n, self.vo_dims, "cross_vo_dims")


def _resize(module, config, qk_dim: int, vo_dim: int) -> None:
    """Re-create query/key/value of a Bert(Self|Cross)Attention at the pruned widths; ``scaling`` stays."""
    module.qk_dim, module.vo_dim = qk_dim, vo_dim
    heads = module.num_attention_heads
    module.query = nn.Linear(config.hidden_size, heads * qk_dim)
    module.key = nn.Linear(config.hidden_size, heads * qk_dim)
    module.value = nn.Linear(config.hidden_size, heads * vo_dim)


def _attend(module, query_layer, key_layer, value_layer, attention_mask, input_shape, **kwargs):
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        module,
        query_layer,
        key_layer,
        value_layer,
        attention_mask,
        dropout=0.0 if not module.training else module.dropout.p,
        scaling=module.scaling,
        **kwargs,
    )
    return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


class CloverBertSelfAttention(BertSelfAttention):
    def __init__(self, config: CloverBertConfig, is_causal=False, layer_idx=None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        i = 0 if layer_idx is None else layer_idx
        _resize(self, config, config.qk_dims[i], config.vo_dims[i])

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query_layer = self.query(hidden_states).view(*input_shape, -1, self.qk_dim).transpose(1, 2)
        key_layer = self.key(hidden_states).view(*input_shape, -1, self.qk_dim).transpose(1, 2)
        value_layer = self.value(hidden_states).view(*input_shape, -1, self.vo_dim).transpose(1, 2)

        if past_key_values is not None:
            current_past_key_values = past_key_values
            if isinstance(past_key_values, EncoderDecoderCache):
                current_past_key_values = past_key_values.self_attention_cache
            key_layer, value_layer = current_past_key_values.update(key_layer, value_layer, self.layer_idx)

        return _attend(self, query_layer, key_layer, value_layer, attention_mask, input_shape, **kwargs)


class CloverBertCrossAttention(BertCrossAttention):
    def __init__(self, config: CloverBertConfig, is_causal=False, layer_idx=None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        i = 0 if layer_idx is None else layer_idx
        _resize(self, config, config.cross_qk_dims[i], config.cross_vo_dims[i])

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, past_key_values=None,
                **kwargs):
        input_shape = hidden_states.shape[:-1]
        query_layer = self.query(hidden_states).view(*input_shape, -1, self.qk_dim).transpose(1, 2)

        is_updated = past_key_values.is_updated.get(self.layer_idx) if past_key_values is not None else False
        if past_key_values is not None and is_updated:
            key_layer = past_key_values.cross_attention_cache.layers[self.layer_idx].keys
            value_layer = past_key_values.cross_attention_cache.layers[self.layer_idx].values
        else:
            kv_shape = encoder_hidden_states.shape[:-1]
            key_layer = self.key(encoder_hidden_states).view(*kv_shape, -1, self.qk_dim).transpose(1, 2)
            value_layer = self.value(encoder_hidden_states).view(*kv_shape, -1, self.vo_dim).transpose(1, 2)
            if past_key_values is not None:
                key_layer, value_layer = past_key_values.cross_attention_cache.update(
                    key_layer, value_layer, self.layer_idx
                )
                past_key_values.is_updated[self.layer_idx] = True

        return _attend(self, query_layer, key_layer, value_layer, attention_mask, input_shape, **kwargs)


class CloverBertAttention(BertAttention):
    """BertAttention holding the pruned self/cross attention and an output ``dense`` of ``Linear(H*vo, hidden)``."""

    def __init__(self, config: CloverBertConfig, is_causal=False, layer_idx=None, is_cross_attention=False):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx, is_cross_attention=is_cross_attention)
        attention_class = CloverBertCrossAttention if is_cross_attention else CloverBertSelfAttention
        self.self = attention_class(config, is_causal=is_causal, layer_idx=layer_idx)
        self.output.dense = nn.Linear(config.num_attention_heads * self.self.vo_dim, config.hidden_size)


class CloverBertPreTrainedModel(BertPreTrainedModel):
    config_class = CloverBertConfig


class CloverBertModel(CloverBertPreTrainedModel, BertModel):
    def __init__(self, config: CloverBertConfig, add_pooling_layer=True):
        BertModel.__init__(self, config, add_pooling_layer=add_pooling_layer)
        for i, layer in enumerate(self.encoder.layer):
            layer.attention = CloverBertAttention(config, is_causal=config.is_decoder, layer_idx=i)
            if hasattr(layer, "crossattention"):
                layer.crossattention = CloverBertAttention(config, is_causal=False, layer_idx=i,
                                                           is_cross_attention=True)
        self.post_init()


class CloverBertForMaskedLM(CloverBertPreTrainedModel, BertForMaskedLM):
    def __init__(self, config: CloverBertConfig):
        CloverBertPreTrainedModel.__init__(self, config)
        self.bert = CloverBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()


class CloverBertForSequenceClassification(CloverBertPreTrainedModel, BertForSequenceClassification):
    def __init__(self, config: CloverBertConfig):
        CloverBertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = CloverBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


CLASSES = {"config": CloverBertConfig, "base": CloverBertModel, "masked_lm": CloverBertForMaskedLM,
           "sequence_classification": CloverBertForSequenceClassification}
