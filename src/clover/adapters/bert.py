"""BERT encoders: ``attention.self.{query,key,value}`` and ``attention.output.dense`` as O.

Absolute position embeddings are added before the layers, so Q-K and V-O are both exact; all four projections
carry biases. Cross-attention (``add_cross_attention`` in a BERT decoder) reads K and V from the encoder states.
"""

from __future__ import annotations

from torch import nn
from transformers.models.bert.modeling_bert import BertAttention

from ..pairs import AttentionWeights
from .base import Adapter, AttentionSite, linear_projection, write_linear


class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert", "clover_bert")

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        heads = model.config.num_attention_heads
        sites = []
        for name, module in model.named_modules():
            if isinstance(module, BertAttention):
                layer = int(name.split("layer.")[1].split(".")[0])
                role = "cross" if module.is_cross_attention else "self"
                sites.append(AttentionSite(name, layer, module, heads, heads, rotary=False, role=role))
        return sites

    def read(self, site: AttentionSite) -> AttentionWeights:
        s, o = site.module.self, site.module.output.dense
        return AttentionWeights(
            linear_projection(s.query), linear_projection(s.key), linear_projection(s.value),
            linear_projection(o), site.num_heads, site.num_kv_heads,
        )

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.dense", m.dense) for name, m in model.named_modules() if name.endswith("intermediate")]

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        s = site.module.self
        return {"q": s.query, "k": s.key, "v": s.value, "o": site.module.output.dense}

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        s, o = site.module.self, site.module.output.dense
        for layer, p in ((s.query, weights.q), (s.key, weights.k), (s.value, weights.v), (o, weights.o)):
            write_linear(layer, p)
