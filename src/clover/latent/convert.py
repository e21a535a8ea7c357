"""``to_latent``: a model whose KV cache holds one shared key latent and one value latent per layer.

Flow: checks -> calibration (the attention input's second moment, and the attention-mixed one per head) ->
per-layer analysis -> one budget, split by held-out loss -> the family's latent runtime (``clover_latent_llama``,
``clover_latent_gpt2``; ``families``) -> verified against the same function written as plain k/v projections.
The input model is left untouched.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate
from ..adapters import adapter_for
from ..errors import CloverError
from ..heldout import split_windows
from ..pairs import check_finite
from ..sizes import SizeReport, parameter_count
from .analysis import LayerAnalysis, analyse
from .budget import Spectrum, allocate
from .config import LatentConfig
from .families import Family, family_for
from .mixing import mixed_moments
from .rewrite import LayerPlan, LayerWeights, realize



@dataclass
class LayerLatent:
    layer: int
    k_rank: int
    shared_components: int
    v_rank: int
    cached_before: int
    cached_after: int


@dataclass
class LatentReport(SizeReport):
    model_type: str
    rope: str
    allocation: str
    kv_ratio: float
    split: float | None
    split_losses: dict[str, float]
    layers: list[LayerLatent]


def check_model(model: nn.Module) -> Family:
    """The family's latent runtime can hold this model (refused with the reason otherwise)."""
    family = family_for(model)
    family.check(model)
    return family


def _plans(analyses: list[LayerAnalysis], config: LatentConfig, split: float) -> list[LayerPlan]:
    """Ranks and components per layer for one split weight."""
    shared = config.rope == "shared"
    k_specs = [Spectrum(a.rotary.energy.flatten().sort(descending=True).values, 2) if shared
               else Spectrum(a.key_gains()) for a in analyses]
    v_specs = [Spectrum(a.value_gains()) for a in analyses]
    if config.fixed_dims:
        for a, ks, vs in zip(analyses, k_specs, v_specs, strict=True):
            k_cap, v_cap = len(ks.gains) * ks.cost, len(vs.gains)
            if config.k_dims > k_cap or config.v_dims > v_cap:
                raise CloverError(f"--k-dims {config.k_dims} / --v-dims {config.v_dims}: layer {a.layer} has at most "
                                  f"{k_cap} key and {v_cap} value dims")
        k_units = [config.k_dims // k_specs[0].cost] * len(analyses)
        v_units = [config.v_dims] * len(analyses)
    else:
        spend = allocate(k_specs, v_specs, config.kv_ratio, config.allocation, split)
        k_units, v_units = spend.k_units, spend.v_units
    plans = []
    for a, k, v in zip(analyses, k_units, v_units, strict=True):
        if shared:
            plans.append(LayerPlan(a.layer, a.component_order()[:k], 0, v))
        elif config.rope == "mix":
            count = min(math.floor(config.shared_fraction * k / 2), len(a.component_order()))
            plans.append(LayerPlan(a.layer, a.component_order()[:count], k - 2 * count, v))
        else:
            plans.append(LayerPlan(a.layer, [], k, v))
    return plans


def _loss(model: nn.Module, batches: torch.Tensor) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        losses = [float(model(input_ids=b[None].to(device), labels=b[None].to(device)).loss) for b in batches]
    return sum(losses) / len(losses)


def _write_refit(family: Family, latent: nn.Module, rewritten: list[LayerWeights]) -> None:
    """The refit O blocks go in after the layout check: plain k/v projections cannot express them, so the runtime
    is verified with the absorbed O first, and the refit then only replaces O's weight."""
    with torch.no_grad():
        for layer, lw in enumerate(rewritten):
            if lw.o_refit is not None:
                family.write_o(latent, layer, lw.o_refit.to(next(latent.parameters()).dtype))


def _verify(latent: nn.Module, twin: nn.Module) -> None:
    """The runtime must compute what the plain-projection rewrite computes (same function, other layout)."""
    inputs = adapter_for(twin).example_inputs(twin, batch=2, seqlen=24)
    with torch.no_grad():
        want = twin(**inputs).logits.double()
        got = latent(**inputs).logits.double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    tol = 1e-3 if next(latent.parameters()).dtype == torch.float32 else 5e-2
    if err > tol:
        raise CloverError(f"internal: the latent runtime differs from the intended rewrite by {err:.1e} (relative); "
                          "nothing was saved")


def to_latent(model: nn.Module, config: LatentConfig) -> tuple[nn.Module, LatentReport]:
    """Return ``(latent_model, report)``; ``model`` itself is not modified."""
    config.check()
    config.check_against(model.config)
    family = check_model(model)
    if config.rope != "latent" and not family.rotary:
        raise CloverError(f"--rope {config.rope} shares rotary components, and this {model.config.model_type} model "
                          "has no rotary embeddings: keys are absorbed into the queries there; drop --rope")
    collected: list[str] = []

    def warn(message: str) -> None:
        collected.append(message)
        warnings.warn(message, stacklevel=2)

    if config.calibration is None:
        raise CloverError("latent conversion is data-aware: pass calibration token ids (--calib PATH or CLOVER_DATA)")
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    weights = [adapter.read(site) for site in sites]
    for site, w in zip(sites, weights, strict=True):
        check_finite(w, site)
    hidden = model.config.hidden_size
    searching = config.searches_split()
    holdout, statistics = split_windows(config.calibration, config.holdout, searching, hidden + 1)
    stats = calibrate.collect(model, adapter, sites, statistics, inputs=True, progress=config.progress)
    twin = family.emulator(model)
    mixed = {}
    if config.v_moment == "mixed":
        mixed = mixed_moments(twin, adapter, statistics, progress=config.progress)
        twin.config._attn_implementation = model.config._attn_implementation
    head_dim = getattr(model.config, "head_dim", None) or getattr(model.config, "attn_head_dim", None) \
        or hidden // model.config.num_attention_heads  # attn_head_dim: a sliced GPT-2's heads keep their width
    analyses = [analyse(site.layer, w, stats.sites[site.name].q_input, head_dim, site.rotary, config.compute_dtype,
                        warn, mixed.get(site.layer))
                for site, w in tqdm(list(zip(sites, weights, strict=True)), desc="analyse", unit="layer",
                                    disable=not config.progress)]

    losses: dict[str, float] = {}
    split = None
    if searching:
        for candidate in tqdm(config.split_grid, desc="key/value split", unit="split", disable=not config.progress):
            family.emulate(twin, [realize(a, p) for a, p in zip(analyses, _plans(analyses, config, candidate),
                                                         strict=True)])
            losses[f"{candidate:g}"] = _loss(twin, holdout)
        split = min(config.split_grid, key=lambda s: losses[f"{s:g}"])
    elif not isinstance(config.split, str):
        split = float(config.split)
    plans = _plans(analyses, config, split if split is not None else 1.0)
    rewritten = [realize(a, p, refit=config.o_refit) for a, p in zip(analyses, plans, strict=True)]
    family.emulate(twin, rewritten)
    latent = family.runtime(model, analyses, plans, rewritten)
    _verify(latent, twin)
    _write_refit(family, latent, rewritten)

    size = next(model.parameters()).element_size()
    before = [2 * w.num_kv_heads * head_dim for w in weights]
    layers = [LayerLatent(p.layer, p.k_rank, len(p.components), p.v_rank, b, p.cached)
              for p, b in zip(plans, before, strict=True)]
    report = LatentReport(model.config.model_type, config.rope, "fixed" if config.fixed_dims else config.allocation,
                          config.kv_ratio, split, losses, layers, params_before=parameter_count(model),
                          params_after=parameter_count(latent), kv_bytes_per_token_before=sum(before) * size,
                          kv_bytes_per_token_after=sum(p.cached for p in plans) * size,
                          calibration_tokens=stats.tokens, warnings=collected)
    report.warn_if_larger()
    if config.rope != "shared" and family.rotary:
        report.notes.append("keys are rebuilt from the pre-RoPE latent at attention time: decoding pays for that "
                            "in compute at long contexts (see benchmarks/latent_kv.py)")
    return latent, report
