"""Which runtime holds a sliced model, per family, and what its config must say.

- LLaMA family (llama, mistral, qwen2, and clover_llama for pruned ones): ``clover_llama``, whose config carries
  ``head_dim`` apart from ``hidden_size`` (stock Qwen2 cannot) and a final-norm projection for tied heads. The
  stock RMSNorm divides by the new width; slicing wants the original one (the kept coordinates hold almost all of
  the energy, not all of the dims), which is the same function with the norm's scale ``sqrt(D / D')`` and epsilon
  ``eps * D / D'``: no new norm class is needed.
- DeepSeek-V2: the stock class with a smaller ``hidden_size`` and the same norm identity; tied heads are refused
  (the stock class has no place for the final-norm map).
- GPT-2: ``clover_gpt2`` with ``norm_dim`` / ``norm_skip`` (its LayerNorms become norms over the rotated stream that
  skip the mean coordinate), the original head width and MLP width written out, and ``ln_f``'s projection.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .. import modeling
from ..adapters.residual import ResidualLayout
from ..errors import CloverError
from ..rebuild import DROPPED_SETTINGS as DROPPED, copy_matching, keep_buffer_dtypes

LLAMA_TYPES = ("llama", "mistral", "qwen2", "clover_llama")
SUPPORTED = (*LLAMA_TYPES, "gpt2", "clover_gpt2", "deepseek_v2")


def check_config(config) -> None:
    """What ``config.json`` alone says slicing cannot do, in one line (before any weights load)."""
    kind = config.model_type
    if kind not in SUPPORTED:
        raise CloverError(f"slicing has no folding rule for model type {kind!r}: supported are "
                          f"{', '.join(SUPPORTED)} (the LLaMA family, GPT-2, DeepSeek-V2)")
    if getattr(config, "head_proj", False) or getattr(config, "norm_dim", None) is not None:
        raise CloverError("this model is already sliced (its norms were folded): slice the original once with the "
                          "combined ratio")
    if kind in ("gpt2", "clover_gpt2") and getattr(config, "add_cross_attention", False):
        raise CloverError("slicing GPT-2 with cross-attention is not supported: the encoder states it reads live in "
                          "another basis")
    if kind == "deepseek_v2" and getattr(config, "tie_word_embeddings", False):
        raise CloverError("DeepSeek-V2 with tied embeddings cannot be sliced into the stock class (its final norm's "
                          "scale would need a map before the shared table): untie the head first")
    if kind in LLAMA_TYPES:
        try:
            modeling.family_module(kind).llama_settings(config)
        except ValueError as error:
            raise CloverError(f"cannot slice this {kind} model: {error}") from None


def check_width(model_config, slice_config) -> None:
    """The kept width from ``config.json`` alone (the rule ``slice_`` applies): a ratio that leaves nothing, or
    rounds to nothing at the kernel multiple, is refused before any weights load."""
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if hidden:
        reserved = 1 if model_config.model_type in ("gpt2", "clover_gpt2") else 0  # LayerNorm's mean coordinate stays
        slice_config.width(hidden, reserved=reserved, family_step=width_step(model_config))


def check_family(model: nn.Module, layout: ResidualLayout | None) -> None:
    """Refuse, in one line, what slicing cannot do for this loaded model."""
    check_config(model.config)
    if modeling.task_of(model) != "causal_lm":
        raise CloverError(f"slicing needs a causal LM, not a {type(model).__name__}: load the model with its "
                          "language-modelling head")
    if layout is None:
        raise CloverError(f"slicing has no folding rule for this {model.config.model_type} model")


def width_step(config) -> int:
    """A multiple the family's config needs the hidden width to be (DeepSeek-V2's config checks that the head
    count divides it, though its heads have their own dims)."""
    return config.num_attention_heads if config.model_type == "deepseek_v2" else 1


def norm_weight(layout: ResidualLayout, hidden: int, width: int) -> float:
    """The scale every stream norm gets: ``sqrt(D / D')`` for RMS norms of stock form, 1 for clover's GPT-2 norm
    (which divides by ``norm_dim`` itself)."""
    return 1.0 if layout.norm == "layer" else math.sqrt(hidden / width)


def sliced_config(model: nn.Module, layout: ResidualLayout, width: int):
    """The config of the sliced model and the class to build."""
    config, kind = model.config, model.config.model_type
    hidden = config.hidden_size
    if kind in LLAMA_TYPES:
        module = modeling.family_module("clover_llama")
        settings = {k: v for k, v in module.llama_settings(config).items() if k not in DROPPED}
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        settings.update(hidden_size=width, head_dim=head_dim, rms_norm_eps=config.rms_norm_eps * hidden / width,
                        head_proj=layout.tied)
        new = module.CloverLlamaConfig(**settings)
        new.architectures = ["CloverLlamaForCausalLM"]
        return new, module.CloverLlamaForCausalLM
    if kind == "deepseek_v2":
        new = copy.deepcopy(config)
        new.hidden_size, new.rms_norm_eps = width, config.rms_norm_eps * hidden / width
        return new, type(model)
    module = modeling.family_module("clover_gpt2")
    settings = {k: v for k, v in config.to_dict().items() if k not in DROPPED}
    settings.update(n_embd=width, norm_dim=hidden, norm_skip=0, attn_head_dim=hidden // config.n_head,
                    n_inner=config.n_inner or 4 * hidden)
    new = module.CloverGPT2Config(**settings)
    new.architectures = ["CloverGPT2LMHeadModel"]
    return new, module.CloverGPT2LMHeadModel


def build(model: nn.Module, layout: ResidualLayout, width: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of the sliced runtime holding ``tensors`` (the rewritten ones) and every other tensor of
    ``model`` unchanged; every tensor of the new model must be accounted for."""
    config, cls = sliced_config(model, layout, width)
    reference = next(model.parameters())
    sliced = cls(config).to(device=reference.device, dtype=reference.dtype)
    copy_matching(sliced, {**model.state_dict(), **tensors}, complete=True)
    keep_buffer_dtypes(sliced, model)
    return sliced.eval()
