"""Pruned DeepSeek-V2 is a stock transformers model with smaller ``qk_nope_head_dim`` / ``v_head_dim``.

MLA's head dims are config fields that ``DeepseekV2Attention`` already reads, so no clover runtime is needed: the
saved directory reloads with ``AutoModelForCausalLM.from_pretrained`` anywhere transformers runs. The config holds
one value for all layers, so the layers' ranks must agree. The stock class would set the softmax scale from the new
``qk_head_dim``; the original scale is kept by folding ``original / new`` into every query row (see
``clover.adapters.deepseek_v2``) and recording it as ``config.clover_softmax_scale``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import CloverError
from ..rebuild import copy_matching


def query_projection(m: nn.Module) -> nn.Linear:
    """``q_proj`` without a query latent, ``q_b_proj`` with one (``q_lora_rank`` set)."""
    return m.q_proj if m.q_proj is not None else m.q_b_proj


def query_fold(m: nn.Module) -> float:
    """Factor folded into the physical query rows so that it times the stock scale is the original scale."""
    original = getattr(m.config, "clover_softmax_scale", None)
    return 1.0 if original is None else original / m.scaling


def build_pruned(model: nn.Module, layers: list) -> nn.Module:
    """A fresh model of ``model``'s own class with the pruned dims, holding every weight the adapter does not write.

    The query's rotary rows are copied here (rescaled for the new fold); nope rows, ``kv_b_proj`` and ``o_proj`` are
    written by the adapter next.
    """
    dims = {(lr.qk_dim, lr.vo_dim) for lr in layers}
    if len(dims) != 1 or len(layers) != model.config.num_hidden_layers:
        raise CloverError(f"DeepSeek-V2 keeps one qk_nope_head_dim / v_head_dim for every layer, but the chosen "
                          f"ranks differ ({sorted(dims)}): use --allocation uniform")
    (nope, v_dim), = dims
    first = model.model.layers[0].self_attn if hasattr(model, "model") else model.layers[0].self_attn
    original_scale = getattr(model.config, "clover_softmax_scale", None) or first.scaling
    config = copy.deepcopy(model.config)
    config.qk_nope_head_dim, config.v_head_dim = nope, v_dim
    config.qk_head_dim = nope + config.qk_rope_head_dim
    config.clover_softmax_scale = original_scale
    reference = next(model.parameters())
    pruned = type(model)(config).to(device=reference.device, dtype=reference.dtype).eval()

    own, source = pruned.state_dict(), model.state_dict()
    unexpected = [k for k in source if k not in own]
    if unexpected:
        raise CloverError(f"internal: weights with no place in the pruned model: {unexpected[:3]}")
    copy_matching(pruned, source)
    with torch.no_grad():
        old_attn = {name: m for name, m in model.named_modules() if hasattr(m, "kv_b_proj")}
        for name, new in pruned.named_modules():
            if name in old_attn:
                _copy_rope_rows(old_attn[name], new)
    return pruned


def _copy_rope_rows(old: nn.Module, new: nn.Module) -> None:
    """Rotary query rows carry the scale fold too: physical = logical * fold, and the fold changes with the dims."""
    heads = old.num_heads
    src = query_projection(old).weight.reshape(heads, -1, query_projection(old).weight.shape[-1])
    dst = query_projection(new).weight.view(heads, -1, src.shape[-1])
    logical = src[:, old.qk_nope_head_dim:].double() / query_fold(old)
    dst[:, new.qk_nope_head_dim:] = (logical * query_fold(new)).to(dst.dtype)
