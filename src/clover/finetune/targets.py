"""What CLOVER fine-tuning can train in a model, and what that costs in trainable parameters.

Targets:

- ``qk``: the cross-layer Q-K pair, one d x d core per KV group. Exact only without rotary embeddings.
- ``k``: the intra-layer QR form of K (``K = Q_k R_k``, ``R_k`` trained), the paper's choice for rotary models.
- ``vo``: the cross-layer V-O pair, one d x d core per KV group; exact in every family.
- ``up``: the MLP up projection in head-sized blocks of output rows, one d x d core per block (the U-D term).
- ``rope``: where every head meets one shared rotated key (MLA), each head's rotated query rows, one
  ``rope x rope`` core per head applied before RoPE (``k``'s form on the query side: the shared key stays as is).

Counts are computed from shapes so that ``--match-params-of lora:r=N`` can compare budgets before anything is
built; the LoRA count is what peft trains on the same modules, ``r * (in + out)`` per module.
"""

from __future__ import annotations

import itertools
import math

from torch import nn

from ..adapters import Adapter, AttentionSite, adapter_for
from ..errors import CloverError
from ..pairs import pair_width

TARGETS = ("qk", "k", "vo", "up", "rope")
ROTARY_QK = ("target 'qk' needs a model without rotary embeddings (rotary embeddings sit between Q and K, so the "
             "cross-layer rewrite would not be exact): use target 'k' (the intra-layer QR form) instead")


def _family(model: nn.Module) -> str:
    """How errors name the model: its transformers model type, else its class (diffusers configs have no type)."""
    return getattr(model.config, "model_type", None) or type(model).__name__


def block_size(model: nn.Module) -> int:
    """Head-sized MLP blocks: the model's original head dim (pruned configs keep it)."""
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _keys_hidden(adapter: Adapter, site: AttentionSite) -> bool:
    """Whether the adapter shows no K projection at this site (latent models keep keys in another form)."""
    return adapter.read(site).k.weight.shape[0] == 0


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The paper's recipe: Q-K cross-layer where exact (else K's QR form), V-O, and the MLP up blocks."""
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if any(_keys_hidden(adapter, site) for site in sites):  # a latent model with keys only in its latent
        return ("vo",) + (("up",) if adapter.mlp_up(model) else ())
    qk = "k" if any(site.rotary for site in sites) else "qk"
    return (qk, "vo") + (("up",) if adapter.mlp_up(model) else ())


def target_names(targets) -> tuple[str, ...]:
    """``targets`` (a tuple, or names separated by commas) checked as names, without a model: known, at least one,
    not both Q-K forms. Settings call it before any weights load; ``resolve_targets`` adds what needs the model."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(dict.fromkeys(targets))
    if not targets:
        raise CloverError(f"no fine-tuning targets given: use some of {', '.join(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise CloverError(f"unknown fine-tuning target(s) {unknown}: use some of {', '.join(TARGETS)}")
    if "qk" in targets and "k" in targets:
        raise CloverError("targets 'qk' and 'k' both train the Q-K scores: pick one")
    return targets


def resolve_targets(model: nn.Module, targets) -> tuple[Adapter, list[AttentionSite], tuple[str, ...]]:
    """Validate ``targets`` against the model; every failure names the fix."""
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise CloverError(f"no attention blocks found in this {_family(model)} model: "
                          "pass a full model (with its attention layers)")
    targets = target_names(default_targets(model) if targets is None else targets)
    if "qk" in targets and any(site.rotary for site in sites):
        raise CloverError(ROTARY_QK)
    hidden = [site for site in sites if _keys_hidden(adapter, site)]
    if ("qk" in targets or "k" in targets) and hidden:
        raise CloverError(f"targets 'qk' / 'k' cannot train this {_family(model)} model's keys: "
                          f"{hidden[0].qk_inexact}; use 'vo' and 'up'")
    if "rope" in targets and adapter.shared_rope_query(sites[0]) is None:
        raise CloverError(f"target 'rope' trains query rows that meet a rotated key shared by every head (an MLA "
                          f"conversion); this {_family(model)} model has a key per head: drop 'rope' (use 'k')")
    if "up" in targets and not adapter.mlp_up(model):
        raise CloverError(f"this {_family(model)} model has no MLP up projection clover knows: "
                          "drop 'up' from the targets")
    return adapter, sites, targets


def target_modules(model: nn.Module, targets) -> list[str]:
    """Names of the modules the targets touch: what LoRA / PiSSA / DoRA adapt for a like-for-like comparison."""
    adapter, sites, targets = resolve_targets(model, targets)
    names = {id(m): n for n, m in model.named_modules()}
    wanted = {"qk": ("q", "k"), "k": ("k",), "vo": ("v", "o"), "rope": ("q",)}
    out: list[str] = []
    for site in sites:
        projections = adapter.projections(site)
        for t in targets:
            for role in wanted.get(t, ()):
                out.append(names[id(projections[role])])
    if "up" in targets:
        out.extend(name for name, _ in adapter.mlp_up(model))
    return list(dict.fromkeys(out))


def clover_parameter_count(model: nn.Module, targets, train_bias: bool = False) -> int:
    """Trainable parameters CLOVER adds for ``targets``: d x d per KV group per pair (d no wider than the pair's
    rank can be, ``pairs.pair_width``), d x d per MLP block, rope x rope per head for ``rope``."""
    adapter, sites, targets = resolve_targets(model, targets)
    total = 0
    for site in sites:
        w = adapter.read(site)
        for t in targets:
            if t == "k":
                total += w.num_kv_heads * w.qk_dim ** 2
            elif t == "rope":
                heads, rope = adapter.shared_rope_query(site)[1].shape
                total += heads * rope ** 2
            elif t in ("qk", "vo"):
                total += w.num_kv_heads * pair_width(w, t) ** 2
        if train_bias and any(t != "up" for t in targets):
            total += sum(p.bias.numel() for p in (w.q, w.k, w.v, w.o) if p.bias is not None)
    if "up" in targets:
        block = block_size(model)
        for _, module in adapter.mlp_up(model):
            total += _out_features(module) * block
            if train_bias and getattr(module, "bias", None) is not None:
                total += module.bias.numel()
    return total


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # transformers Conv1D stores (in, out)


def _out_features(module: nn.Module) -> int:
    return _in_out(module)[1]


def lora_parameter_count(model: nn.Module, modules: list[str], r: int) -> int:
    """What peft's LoRA of rank ``r`` trains on ``modules``: ``A`` (r x in) and ``B`` (out x r) per module."""
    by_name = dict(model.named_modules())
    return sum(r * sum(_in_out(by_name[name])) for name in modules)


def parse_match(spec: str) -> int:
    """``lora:r=N`` -> N."""
    method, _, setting = spec.partition(":")
    key, _, value = setting.partition("=")
    if method.strip() != "lora" or key.strip() != "r" or not value.strip().isdigit() or int(value) < 1:
        raise CloverError(f"cannot read --match-params-of {spec!r}: write it as lora:r=N with N a positive integer")
    return int(value)


def match_lora(model: nn.Module, targets, r: int, train_bias: bool = False) -> tuple[tuple[str, ...], int, int]:
    """The subset of ``targets`` whose CLOVER count is closest (in ratio) to LoRA r on the modules of ``targets``.

    Returns ``(chosen targets, clover count, lora count)``.
    """
    _, _, targets = resolve_targets(model, targets)
    lora = lora_parameter_count(model, target_modules(model, targets), r)
    best = None
    for n in range(len(targets), 0, -1):
        for subset in itertools.combinations(targets, n):
            count = clover_parameter_count(model, subset, train_bias)
            score = abs(math.log(count / lora))
            if best is None or score < best[0] - 1e-12:
                best = (score, subset, count)
    return best[1], best[2], lora
