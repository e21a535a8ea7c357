"""GPT-2: Q, K and V share one fused ``Conv1D`` (``c_attn``, weight stored ``in x out``), O is ``c_proj``.

No rotary embeddings, biases everywhere, plain multi-head attention: both pairs are exact. Cross-attention
blocks (``add_cross_attention=True``) take Q from ``q_attn`` and K, V from ``c_attn`` over the encoder states.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from ..pairs import AttentionWeights, Projection
from .base import Adapter, AttentionSite, set_parameter
from .residual import NormSite, Port, ResidualLayout


def _conv_projection(conv: nn.Module, rows: slice) -> Projection:
    """Conv1D computes ``x @ W + b`` with W (in, out): transpose a column slice into Linear orientation."""
    return Projection(conv.weight.detach()[:, rows].T, conv.bias.detach()[rows])


def _write_conv(conv: nn.Module, parts: list[Projection]) -> None:
    set_parameter(conv.weight, torch.cat([p.weight for p in parts], dim=0).T)
    set_parameter(conv.bias, torch.cat([p.bias for p in parts], dim=0))
    conv.nf = conv.weight.shape[1]


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2", "clover_gpt2")

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        heads = model.config.n_head
        return [
            AttentionSite(name, module.layer_idx, module, heads, heads, rotary=False,
                          role="cross" if module.is_cross_attention else "self")
            for name, module in model.named_modules()
            if isinstance(module, GPT2Attention)
        ]

    def read(self, site: AttentionSite) -> AttentionWeights:
        m = site.module
        sizes = self._out_sizes(m)
        if site.role == "cross":
            q = _conv_projection(m.q_attn, slice(None))
            k = _conv_projection(m.c_attn, slice(0, sizes[0]))
            v = _conv_projection(m.c_attn, slice(sizes[0], None))
        else:
            q = _conv_projection(m.c_attn, slice(0, sizes[0]))
            k = _conv_projection(m.c_attn, slice(sizes[0], sizes[0] + sizes[1]))
            v = _conv_projection(m.c_attn, slice(sizes[0] + sizes[1], None))
        o = _conv_projection(m.c_proj, slice(None))
        return AttentionWeights(q, k, v, o, site.num_heads, site.num_kv_heads)

    @staticmethod
    def _out_sizes(m: GPT2Attention) -> list[int]:
        """Output widths of the fused projections (Q and K share ``qk_dim``; V has ``vo_dim``)."""
        qk = getattr(m, "qk_dim", m.head_dim) * m.num_heads
        vo = getattr(m, "vo_dim", m.head_dim) * m.num_heads
        return [qk, vo] if m.is_cross_attention else [qk, qk, vo]

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.c_fc", m.c_fc) for name, m in model.named_modules()
                if name.endswith("mlp") and hasattr(m, "c_fc")]

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        m = site.module
        return {"q": m.q_attn if site.role == "cross" else m.c_attn, "k": m.c_attn, "v": m.c_attn, "o": m.c_proj}

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        m = site.module
        if site.role == "cross":
            _write_conv(m.q_attn, [weights.q])
            _write_conv(m.c_attn, [weights.k, weights.v])
        else:
            _write_conv(m.c_attn, [weights.q, weights.k, weights.v])
        _write_conv(m.c_proj, [weights.o])

    def residual_layout(self, model: nn.Module) -> ResidualLayout | None:
        """LayerNorms with a shift: ``ln_1`` feeds ``c_attn``, ``ln_2`` the MLP's ``c_fc`` (Conv1D weights are
        (in, out), so the hidden axis is 0 for readers and 1 for writers); token and position tables both write the
        first state. ``ln_f``'s shift cannot fold into the bias-free head, so it always gets a projection."""
        if getattr(model.config, "add_cross_attention", False):
            return None
        norms, writers = [], []
        for i in range(model.config.n_layer):
            p = f"transformer.h.{i}"
            norms.append(NormSite(f"{p}.ln_1", f"{p}.ln_1.weight", f"{p}.ln_1.bias",
                                  (Port(f"{p}.attn.c_attn.weight", 0, f"{p}.attn.c_attn.bias"),)))
            norms.append(NormSite(f"{p}.ln_2", f"{p}.ln_2.weight", f"{p}.ln_2.bias",
                                  (Port(f"{p}.mlp.c_fc.weight", 0, f"{p}.mlp.c_fc.bias"),)))
            writers += [Port(f"{p}.attn.c_proj.weight", 1, f"{p}.attn.c_proj.bias"),
                        Port(f"{p}.mlp.c_proj.weight", 1, f"{p}.mlp.c_proj.bias")]
        final = NormSite("transformer.ln_f", "transformer.ln_f.weight", "transformer.ln_f.bias", ())
        return ResidualLayout("layer", ("transformer.wte.weight", "transformer.wpe.weight"), tuple(norms), final,
                              tuple(writers), "lm_head.weight", bool(getattr(model.config, "tie_word_embeddings",
                                                                             True)))
