"""DeepSeek-V2 and V3 (transformers' ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``): multi-head latent
attention (MLA). The two classes hold the same attention (V3 is what ``clover mla`` writes), so one adapter reads both.

Per head h, the query is ``q_proj`` (or ``q_b_proj(norm(q_a_proj(x)))`` when ``q_lora_rank`` is set), rows
``[nope (qk_nope_head_dim) | rope (qk_rope_head_dim)]``; keys and values come from a shared latent
``c = norm(kv_a_proj_with_mqa(x)[:kv_lora_rank])`` through ``kv_b_proj``, rows ``[k_nope | v]`` per head, while the
rotary key part is one shared head read straight from ``kv_a_proj_with_mqa``. The score is
``scale * (q_nope . k_nope + rope(q_pe) . rope(k_pe))``, so:

- Q-K (exact): the nope rows of the query projection against the k_nope rows of ``kv_b_proj``. No rotary sits
  between them, which is why the site is not marked ``rotary``; ``read`` / ``write`` never touch the rotary
  sub-dims (fine-tuning's ``rope`` target reaches the query's through ``shared_rope_query``).
- V-O (exact): the v rows of ``kv_b_proj`` against the head's block of ``o_proj``.

Every head has its own k_nope and v (MLA expands the latent per head), so the KV group is the head. The two sides
of a pair read different inputs (query: hidden states or the normalised q latent; K/V: the normalised kv latent),
hence ``own_kv_input`` for calibration. MoE and dense MLPs are not attention and are never touched.

Pruned models stay stock ``DeepseekV2ForCausalLM`` (one ``qk_nope_head_dim`` / ``v_head_dim`` for all layers, so
ranks are uniform across layers). The stock class recomputes the softmax scale from the smaller ``qk_head_dim``;
clover keeps the original scale by folding ``c = original_scale / current_scale`` (``sqrt(new qk_head_dim /
original qk_head_dim)``; a yarn mscale factor cancels) into every query row, nope and rope, and records
``clover_softmax_scale`` in the config. ``read`` divides the fold out and ``write``
puts it back, so everything above the adapter sees the logical weights under the original scale.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from ..errors import CloverError
from ..modeling.deepseek_v2 import build_pruned, query_fold, query_projection
from ..pairs import AttentionWeights, Projection
from .base import Adapter, AttentionSite, linear_projection, set_parameter, write_linear
from .residual import NormSite, Port, ResidualLayout

SUPPORTED = ("transformers' DeepseekV2Attention / DeepseekV3Attention (q_proj, or q_a_proj -> q_b_proj; "
             "kv_a_proj_with_mqa -> kv_b_proj; o_proj) with num_key_value_heads == num_attention_heads "
             "and qk_nope_head_dim > 0")


class DeepseekV2Adapter(Adapter):
    name = "deepseek_v2"
    model_types = ("deepseek_v2", "deepseek_v3")
    uniform_head_dims = True
    prune_notes = (
        "DeepSeek-V2: only the non-rotary dims were pruned (qk_nope_head_dim, v_head_dim); the rotary dims and the "
        "MoE/MLP weights are untouched; the pruned model is a stock DeepseekV2 class",
        "DeepSeek-V2: the original softmax scale is kept by folding sqrt(new / original qk_head_dim) into the query "
        "rows, which the stock class scales by 1/sqrt(new qk_head_dim) (config.clover_softmax_scale records it)",
        "DeepSeek-V2: transformers caches the compressed latent (kv_lora_rank + qk_rope_head_dim per token), which "
        "pruning does not change; the savings are kv_b_proj, query and o_proj weights and attention compute",
    )

    def build_pruned(self, model: nn.Module, layers: list) -> nn.Module:
        """A stock DeepseekV2 model with smaller ``qk_nope_head_dim`` / ``v_head_dim``: no clover runtime needed."""
        return build_pruned(model, layers)

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        """Every MLA block, after checking all of them: an unknown variant fails before anything is rewritten."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        found = [(name, m) for name, m in model.named_modules()
                 if name.endswith("self_attn") or hasattr(m, "kv_b_proj")]
        for name, m in found:
            if not isinstance(m, (DeepseekV2Attention, DeepseekV3Attention)):
                raise CloverError(f"{name} is a {type(m).__module__}.{type(m).__name__}: the deepseek adapter "
                                  f"supports {SUPPORTED}; load the model without trust_remote_code")
        if kv_heads != heads:
            raise CloverError(f"this {cfg.model_type} config has num_key_value_heads={kv_heads} but "
                              f"num_attention_heads={heads}: the adapter supports {SUPPORTED}")
        if cfg.qk_nope_head_dim < 1:
            raise CloverError(f"qk_nope_head_dim is {cfg.qk_nope_head_dim}: every query/key dim is rotary, so there "
                              f"is no Q-K pair to decompose; the adapter supports {SUPPORTED}")
        return [AttentionSite(name, m.layer_idx, m, heads, heads, rotary=False, own_kv_input=True) for name, m in found]

    def read(self, site: AttentionSite) -> AttentionWeights:
        m = site.module
        heads, nope, rope, v_dim = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        q = query_projection(m).weight.detach().reshape(heads, nope + rope, -1)
        q_nope = (q[:, :nope] / query_fold(m)).reshape(heads * nope, -1)
        kv = m.kv_b_proj.weight.detach().reshape(heads, nope + v_dim, -1)
        k = kv[:, :nope].reshape(heads * nope, -1)
        v = kv[:, nope:].reshape(heads * v_dim, -1)
        return AttentionWeights(Projection(q_nope), Projection(k), Projection(v), linear_projection(m.o_proj),
                                heads, heads)

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        m = site.module
        return {"q": query_projection(m), "k": m.kv_b_proj, "v": m.kv_b_proj, "o": m.o_proj}

    def shared_rope_query(self, site: AttentionSite) -> tuple[nn.Module, torch.Tensor]:
        """Each head's last ``qk_rope_head_dim`` query rows read the one rotated key ``kv_a_proj_with_mqa`` shares."""
        m = site.module
        nope, rope = m.qk_nope_head_dim, m.qk_rope_head_dim
        rows = torch.arange(m.num_heads * (nope + rope)).reshape(m.num_heads, nope + rope)[:, nope:]
        return query_projection(m), rows

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The dense layers' up projections (``first_k_dense_replace``; every layer of a ``clover mla`` output).
        MoE layers are left out: their routed experts are one fused 3-D tensor, not a linear module."""
        return [(f"{name}.up_proj", m.up_proj) for name, m in model.named_modules()
                if name.endswith("mlp") and isinstance(getattr(m, "up_proj", None), nn.Linear)]

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        """Splice the nope/k/v rows back; rope rows stay. Dims must match the module (``prune`` builds it so)."""
        m = site.module
        heads, nope, v_dim = m.num_heads, m.qk_nope_head_dim, m.v_head_dim
        if (weights.qk_dim, weights.vo_dim) != (nope, v_dim):
            raise CloverError(f"{site.name}: weights with head dims ({weights.qk_dim}, {weights.vo_dim}) do not fit "
                              f"qk_nope_head_dim={nope}, v_head_dim={v_dim}: build pruned DeepSeek-V2 models with "
                              "clover.prune, which sets the new dims in the config")
        query = query_projection(m)
        q = query.weight.detach().clone().reshape(heads, nope + m.qk_rope_head_dim, -1)
        q[:, :nope] = weights.q.weight.reshape(heads, nope, -1).to(q.dtype) * query_fold(m)
        set_parameter(query.weight, q.reshape(query.weight.shape))
        kv = torch.cat([weights.k.weight.reshape(heads, nope, -1), weights.v.weight.reshape(heads, v_dim, -1)], dim=1)
        set_parameter(m.kv_b_proj.weight, kv.reshape(m.kv_b_proj.weight.shape))
        write_linear(m.o_proj, weights.o)

    def adjust_ranks(self, kind: str, keeps: list[int], units: int) -> tuple[list[int], str]:
        """One rank for all layers (the config holds one dim), and an even ``qk_nope_head_dim``.

        transformers views the rotary query slice as complex pairs, which needs an even ``qk_head_dim`` stride.
        """
        rank, why = max(keeps), []
        if len(set(keeps)) > 1:
            why.append("the config holds one head dim for all layers, so every layer keeps the largest any needs")
        if kind == "qk" and rank % 2 and rank < units:
            rank += 1
            why.append("transformers' DeepSeek-V2 needs an even qk_nope_head_dim (rotary slice viewed as complex)")
        return [rank] * len(keeps), "; ".join(why)

    def cache_width(self, site: AttentionSite, weights: AttentionWeights) -> int:
        """transformers caches the compressed latent and the shared rotary key, not the expanded K and V."""
        return site.module.kv_lora_rank + site.module.qk_rope_head_dim

    def residual_layout(self, model: nn.Module) -> ResidualLayout:
        """Dense and MoE layers alike: every expert, the shared experts and the router read the same normed stream
        (routed experts are fused 3-D tensors, (experts, out, hidden) for ``gate_up_proj`` and (experts, hidden,
        in) for ``down_proj``). The inner norms (``kv_a_layernorm``, ``q_a_layernorm``) read latents, not the
        stream, and keep their own epsilon: slicing leaves them alone."""
        state, cfg = model.state_dict(), model.config
        norms, writers = [], []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            query = f"{p}.self_attn.q_a_proj.weight" if f"{p}.self_attn.q_a_proj.weight" in state \
                else f"{p}.self_attn.q_proj.weight"
            kv = f"{p}.self_attn.kv_a_proj_with_mqa.weight"
            norms.append(NormSite(f"{p}.input_layernorm", f"{p}.input_layernorm.weight", None,
                                  (Port(query, 1), Port(kv, 1))))
            writers.append(Port(f"{p}.self_attn.o_proj.weight", 0))
            m = f"{p}.mlp"
            if f"{m}.experts.gate_up_proj" in state:
                readers = [Port(f"{m}.experts.gate_up_proj", 2), Port(f"{m}.gate.weight", 1)]
                writers.append(Port(f"{m}.experts.down_proj", 1))
                if f"{m}.shared_experts.up_proj.weight" in state:
                    readers += [Port(f"{m}.shared_experts.gate_proj.weight", 1),
                                Port(f"{m}.shared_experts.up_proj.weight", 1)]
                    writers.append(Port(f"{m}.shared_experts.down_proj.weight", 0))
            else:
                readers = [Port(f"{m}.gate_proj.weight", 1), Port(f"{m}.up_proj.weight", 1)]
                writers.append(Port(f"{m}.down_proj.weight", 0))
            norms.append(NormSite(f"{p}.post_attention_layernorm", f"{p}.post_attention_layernorm.weight", None,
                                  tuple(readers)))
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        final = NormSite("model.norm", "model.norm.weight", None, () if tied else (Port("lm_head.weight", 1),))
        return ResidualLayout("rms", ("model.embed_tokens.weight",), tuple(norms), final, tuple(writers),
                              "lm_head.weight", tied)
