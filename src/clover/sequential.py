"""Sequential calibration: each layer's statistics are gathered on the model with every earlier layer pruned.

One-shot calibration measures every layer on the original model, so layer i is pruned for inputs it will never
see once layers 0..i-1 are pruned. Here (as SliceGPT and SVD-LLM do) layer i is measured on a working copy in
which layers 0..i-1 already compute their pruned function, so its whitening and its O refit adapt to the error
that reaches it. The working copy keeps the original shapes: a pruned pair is written there as full-width
factors whose dropped columns are zero, which computes exactly what the physically smaller layer computes
(dropped rotary pairs contribute nothing to the logits; dropped V-O directions nothing to the output).

Each layer costs the calibration forward up to that layer (a hook stops it there), about half the model's
forward per layer on average. Single-stack models only (GPT-2, LLaMA family, BERT): with an encoder and a
decoder, "earlier" is not one order of layers.
"""

from __future__ import annotations

import copy
from itertools import groupby
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibrate
from .adapters import Adapter, AttentionSite
from .calibrate import SiteStats
from .criteria import Candidate
from .errors import CloverError
from .pairs import AttentionWeights, PairKind, cast_like, with_factors
from .ranks import choose


class _Reached(Exception):
    """Raised by the hook on the last block of the layer being measured: nothing later is needed."""


def check_supported(sites: list[AttentionSite], config) -> None:
    if len({s.stack for s in sites}) > 1 or any(s.role != "self" for s in sites):
        raise CloverError("sequential calibration needs a single stack of self-attention layers (GPT-2, LLaMA "
                          "family, BERT); this model has several stacks or cross-attention: drop --sequential")
    ranked_globally = [k for k in ("qk", "vo") if config.active(k) and config.threshold_for(k) is None]
    if config.allocation == "global" and ranked_globally:
        raise CloverError("--allocation global ranks every layer against the others before any is pruned, so it "
                          "cannot follow sequential calibration: use --allocation uniform (or a threshold) with "
                          "--sequential, or drop --sequential")


def masked(c: Candidate, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width factors computing what ``c.truncate(keep)`` computes: kept columns in place, the rest zero."""
    left, right = c.truncate(keep)
    idx = c.columns(keep)
    full_left = torch.zeros(*left.shape[:2], c.left.shape[-1], dtype=left.dtype, device=left.device)
    full_right = torch.zeros_like(c.right)
    full_left.scatter_(2, idx[:, None, :].expand(-1, left.shape[1], -1), left)
    full_right.scatter_(2, idx[:, None, :].expand(-1, right.shape[1], -1), right)
    return full_left, full_right


def layer_stats(model: nn.Module, adapter: Adapter, layer_sites: list[AttentionSite], batches: torch.Tensor,
                needs: dict[str, bool]) -> dict[str, SiteStats]:
    """Statistics of ``layer_sites`` (one layer) on ``model``, running each batch only up to that layer."""
    stats = {site.name: SiteStats() for site in layer_sites}
    hooks = calibrate.attach(adapter, layer_sites, stats, **needs)
    seen: set[str] = set()

    def stop(site_name: str):
        def hook(_module, _args, _out):
            seen.add(site_name)
            if len(seen) == len(layer_sites):
                raise _Reached

        return hook

    hooks += [site.module.register_forward_hook(stop(site.name)) for site in layer_sites]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for row in batches:
                seen.clear()
                try:
                    model(**adapter.calibration_inputs(model, row[None].to(device)))
                except _Reached:
                    continue
                raise CloverError(f"internal: layer {layer_sites[0].layer} never ran during sequential calibration")
    finally:
        for h in hooks:
            h.remove()
    return calibrate.finish(stats, batches.numel()).sites


def plan(model: nn.Module, adapter: Adapter, sites: list[AttentionSite], config, targets: dict[PairKind, list],
         weights: dict[str, AttentionWeights], needs: dict[str, bool],
         make_candidate: Callable) -> tuple[dict[PairKind, list[Candidate]], dict[PairKind, list[int]]]:
    """Candidates and per-layer keeps, layer by layer, each measured after the layers before it were pruned.

    ``make_candidate(site, weights, kind, stats)`` is the one-shot path's own constructor, so a layer's choice is
    the one-shot choice given that layer's statistics.
    """
    check_supported(sites, config)
    work = copy.deepcopy(model)
    work_sites = {s.name: s for s in adapter.sites(work)}
    candidates: dict[PairKind, list[Candidate]] = {kind: [] for kind in targets}
    keeps: dict[PairKind, list[int]] = {kind: [] for kind in targets}
    layers = [list(group) for _, group in groupby(sites, key=lambda s: s.layer)]
    for layer_sites in tqdm(layers, desc="sequential calibration", unit="layer", disable=not config.progress):
        stats = layer_stats(work, adapter, [work_sites[s.name] for s in layer_sites], config.calibration, needs)
        for site in layer_sites:
            new = weights[site.name]
            for kind, chosen in targets.items():
                if site not in chosen:
                    continue
                c = make_candidate(site, weights[site.name], kind, stats[site.name])
                keep = choose([c], ratio=config.ratio_for(kind), threshold=config.threshold_for(kind),
                              allocation="uniform", what=f"--{kind}-ratio", names=[site.name])[0]
                candidates[kind].append(c)
                keeps[kind].append(keep)
                new = with_factors(new, kind, *masked(c, keep))
            adapter.write(work_sites[site.name], cast_like(new, weights[site.name]))
    return candidates, keeps
