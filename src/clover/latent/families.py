"""What latent conversion needs to know per family: which models it takes, how to write any key / value map into
a copy of the original (the emulator the split search and the verification run), and how to fill the family's
latent runtime. Everything else in ``clover.latent`` is family-free."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from .. import modeling
from ..adapters import adapter_for, model_type
from ..errors import CloverError
from ..pairs import Projection
from ..rebuild import DROPPED_SETTINGS as DROPPED, copy_matching, keep_buffer_dtypes
from .analysis import LayerAnalysis
from .rewrite import LayerPlan, LayerWeights

# Rotary types whose frequencies do not depend on the sequence length: rotating cached components once and
# rebuilding keys at their cache positions reproduces them exactly.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _copy_shared(latent: nn.Module, model: nn.Module) -> dict:
    """Copy every tensor whose name and shape agree (embeddings, norms, MLPs); returns the source state dict."""
    source = model.state_dict()
    copy_matching(latent, source)
    return source


def _write(layer: nn.Module, weight: torch.Tensor) -> None:
    """A homogeneous (in + 1, out) map into an ``nn.Linear``; its bias (if any) takes the last row."""
    layer.weight.copy_(weight[:-1].mT)
    if layer.bias is not None:
        layer.bias.copy_(weight[-1])


class Family:
    """Shared behaviour: the emulator writes effective K / V maps through the adapter."""

    model_types: tuple[str, ...] = ()
    rotary = False

    def check(self, model: nn.Module) -> None:
        if modeling.task_of(model) != "causal_lm":
            raise CloverError(f"latent conversion needs a causal LM, not a {type(model).__name__}: load the model "
                              "with its language-modelling head")

    def emulator(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    def emulate(self, twin: nn.Module, rewritten: list[LayerWeights]) -> None:
        adapter = adapter_for(twin)
        with torch.no_grad():
            for site, lw in zip(adapter.sites(twin), rewritten, strict=True):
                w = adapter.read(site)
                k, v = (Projection(m[:-1].mT.to(w.k.weight), m[-1].to(w.k.weight)) for m in
                        (lw.k_effective, lw.v_effective))
                adapter.write(site, replace(w, k=k, v=v))

    def runtime(self, model: nn.Module, analyses: list[LayerAnalysis], plans: list[LayerPlan],
                rewritten: list[LayerWeights]) -> nn.Module:
        raise NotImplementedError

    def write_o(self, latent: nn.Module, layer: int, o: torch.Tensor) -> None:
        raise NotImplementedError


class LlamaFamily(Family):
    # clover_llama: a hidden-sliced model (clover.slicing) whose heads still have their full width
    model_types = ("llama", "mistral", "qwen2", "clover_llama")
    rotary = True

    def check(self, model: nn.Module) -> None:
        super().check(model)
        config = model.config
        if config.model_type == "clover_llama" and (
                any(d != config.head_dim for d in (*config.qk_dims, *config.vo_dims))
                or any(p is not None for p in config.rope_pairs)):
            raise CloverError("latent conversion of a per-head pruned model is not supported: convert first, then "
                              "prune the latent model (slice -> latent -> prune)")
        try:
            modeling.family_module(config.model_type).llama_settings(config)
        except ValueError as error:
            raise CloverError(f"cannot convert this {config.model_type} model: {error}") from None
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise CloverError(f"rotary scaling {rope_type!r} is not reproduced by the latent runtime (its frequencies "
                              f"change with the sequence length): supported are {', '.join(ROPE_TYPES)}")
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        if partial != 1.0:
            raise CloverError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported by the "
                              "latent runtime: it rotates whole heads")

    def emulator(self, model: nn.Module) -> nn.Module:
        """A copy whose k/v projections carry biases, to hold any effective key / value map."""
        twin = copy.deepcopy(model)
        for site in adapter_for(twin).sites(twin):
            for name in ("k_proj", "v_proj"):
                old = getattr(site.module, name)
                if old.bias is None:
                    new = nn.Linear(old.in_features, old.out_features, bias=True).to(old.weight)
                    with torch.no_grad():
                        new.weight.copy_(old.weight)
                        new.bias.zero_()
                    setattr(site.module, name, new)
        return twin

    def runtime(self, model, analyses, plans, rewritten):
        module = modeling.family_module("clover_latent_llama")
        settings = modeling.family_module(model.config.model_type).llama_settings(model.config)
        settings = {k: v for k, v in settings.items() if k not in (*DROPPED, "qk_dims", "vo_dims", "rope_pairs")}
        config = module.CloverLatentLlamaConfig(**settings, k_ranks=[p.k_rank for p in plans],
                                                v_ranks=[p.v_rank for p in plans],
                                                rope_freqs=[lw.freqs for lw in rewritten])
        config.architectures = ["CloverLatentLlamaForCausalLM"]
        reference = next(model.parameters())
        latent = module.CloverLatentLlamaForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
        source = _copy_shared(latent, model)
        with torch.no_grad():
            for layer, lw in zip(latent.model.layers, rewritten, strict=True):
                attn, prefix = layer.self_attn, f"model.layers.{layer.self_attn.layer_idx}.self_attn"
                _write(attn.v_down, lw.v_down)
                if lw.k_rope is not None:
                    _write(attn.q_rope, lw.q_rope)
                    _write(attn.k_rope, lw.k_rope)
                if lw.k_down is not None:
                    _write(attn.k_down, lw.k_down)
                    attn.k_up.weight.copy_(lw.k_up.mT)
                    attn.q_proj.weight.copy_(source[f"{prefix}.q_proj.weight"])
                    if attn.q_proj.bias is not None:
                        attn.q_proj.bias.copy_(source[f"{prefix}.q_proj.bias"])
                attn.o_proj.weight.copy_(lw.o)
                if attn.o_proj.bias is not None:
                    attn.o_proj.bias.copy_(source[f"{prefix}.o_proj.bias"])
        keep_buffer_dtypes(latent, model)
        return latent.eval()

    def write_o(self, latent, layer, o):
        latent.model.layers[layer].self_attn.o_proj.weight.copy_(o)


class GPT2Family(Family):
    """No rotary embeddings: the key latent's up-projection folds into the queries, so nothing is rebuilt."""

    # clover_gpt2: a hidden-sliced GPT-2 (clover.slicing) whose heads still have their full width
    model_types = ("gpt2", "clover_gpt2")

    def check(self, model: nn.Module) -> None:
        super().check(model)
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise CloverError("latent conversion of GPT-2 with cross-attention is not supported: convert a "
                              "decoder-only GPT-2")
        if config.model_type == "clover_gpt2":
            head_dim = config.attn_head_dim or config.n_embd // config.n_head
            if any(d != head_dim for d in (*config.qk_dims, *config.vo_dims)):
                raise CloverError("latent conversion of a per-head pruned model is not supported: convert first, "
                                  "then prune the latent model (slice -> latent -> prune)")

    def runtime(self, model, analyses, plans, rewritten):
        module = modeling.family_module("clover_latent_gpt2")
        settings = {k: v for k, v in model.config.to_dict().items()
                    if k not in (*DROPPED, "qk_dims", "vo_dims", "cross_qk_dims", "cross_vo_dims")}
        config = module.CloverLatentGPT2Config(**settings, k_ranks=[p.k_rank for p in plans],
                                               v_ranks=[p.v_rank for p in plans])
        config.architectures = ["CloverLatentGPT2LMHeadModel"]
        reference = next(model.parameters())
        latent = module.CloverLatentGPT2LMHeadModel(config).to(device=reference.device, dtype=reference.dtype)
        _copy_shared(latent, model)
        with torch.no_grad():
            for block, an, lw in zip(latent.transformer.h, analyses, rewritten, strict=True):
                d = an.head_dim
                up = lw.k_up.reshape(lw.k_up.shape[0], an.kv_heads, d)
                queries = [an.q[:, h * d:(h + 1) * d] @ up[:, h // an.group].mT for h in range(an.heads)]
                fused = torch.cat([*queries, lw.k_down, lw.v_down], dim=1)  # (in + 1, H k + k + v)
                block.attn.c_attn.weight.copy_(fused[:-1])  # Conv1D stores (in, out)
                block.attn.c_attn.bias.copy_(fused[-1])
                block.attn.c_proj.weight.copy_(lw.o.mT)
        return latent.eval()

    def write_o(self, latent, layer, o):
        latent.transformer.h[layer].attn.c_proj.weight.copy_(o.mT)


FAMILIES = (LlamaFamily(), GPT2Family())


def family_for(model: nn.Module) -> Family:
    return family_for_type(getattr(getattr(model, "config", None), "model_type", None) or model_type(model))


def family_for_type(kind: str) -> Family:
    """The family converting ``config.model_type`` ``kind`` (from config.json alone, before weights load)."""
    for family in FAMILIES:
        if kind in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise CloverError(f"latent conversion supports {supported} (the LLaMA family and GPT-2), not {kind!r}")
