"""One KV budget, spent where calibration says it buys the most: across keys and values, and across layers.

Every candidate cached dimension has a gain (the weighted error it removes: a squared singular value, or a rotary
component's captured energy, which costs two cached numbers). Keys and values are measured in different units
(score error vs. output error) and layers at different scales, so each gain is divided by its layer's total for
that kind (a share of the layer's key or value energy) and keys are weighed by ``split`` against values;
``to_latent`` chooses ``split`` on held-out calibration windows. (Dividing by model-wide totals instead let the
layers with the largest activations take most of the budget, and measured far worse on SmolLM2.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CloverError


@dataclass
class Spectrum:
    """Candidate gains of one layer's keys or values, strongest first; each unit costs ``cost`` cached dims."""

    gains: torch.Tensor
    cost: int = 1


@dataclass
class Spend:
    """Units kept per layer: key units (latent dims, or shared components) and value dims."""

    k_units: list[int]
    v_units: list[int]


def _greedy(k: list[Spectrum], v: list[Spectrum], budget: int, split: float, k_total: list[float],
            v_total: list[float], layers: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Greedy fill of ``budget`` dims over ``layers``: one key unit and one value dim each first, then the best
    gain per dim, skipping a unit that no longer fits."""
    k_units = {i: 1 for i in layers}
    v_units = {i: 1 for i in layers}
    left = budget - sum(k[i].cost + v[i].cost for i in layers)
    items = []
    for i in layers:
        items += [(float(g) * split / (k_total[i] * k[i].cost), k[i].cost, "k", i) for g in k[i].gains[1:]]
        items += [(float(g) / (v_total[i] * v[i].cost), v[i].cost, "v", i) for g in v[i].gains[1:]]
    # Gains within one spectrum are descending, so a stable sort keeps every layer's picks a prefix.
    for _, cost, kind, i in sorted(items, key=lambda t: -t[0]):
        if cost > left:
            continue
        (k_units if kind == "k" else v_units)[i] += 1
        left -= cost
    return k_units, v_units


def check_floor(ratio: float, allocation: str, full: list[int], floor: list[int]) -> None:
    """Every layer must keep one key unit and one value dim (``floor``) of its ``full`` cached dims."""
    if allocation == "uniform":
        budgets = [round((1 - ratio) * f) for f in full]
        short = [i for i in range(len(full)) if budgets[i] < floor[i]]
        if short:
            raise CloverError(f"--kv-ratio {ratio} leaves layer {short[0]} {budgets[short[0]]} cached dims, fewer than "
                              f"one key and one value dim ({floor[short[0]]}): use a smaller ratio")
        return
    budget = round((1 - ratio) * sum(full))
    if budget < sum(floor):
        raise CloverError(f"--kv-ratio {ratio} leaves {budget} cached dims for {len(full)} layers, fewer than one key "
                          f"and one value dim per layer ({sum(floor)}): use a smaller ratio")


def allocate(k: list[Spectrum], v: list[Spectrum], ratio: float, allocation: str, split: float) -> Spend:
    """Units per layer that keep ``1 - ratio`` of the layers' full cache (``len(gains) * cost`` per kind)."""
    n = len(k)
    full = [len(k[i].gains) * k[i].cost + len(v[i].gains) * v[i].cost for i in range(n)]
    k_total = [max(float(s.gains.sum()), 1e-300) for s in k]
    v_total = [max(float(s.gains.sum()), 1e-300) for s in v]
    floor = [k[i].cost + v[i].cost for i in range(n)]
    check_floor(ratio, allocation, full, floor)
    if allocation == "uniform":
        budgets = [round((1 - ratio) * full[i]) for i in range(n)]
        picks = [_greedy(k, v, budgets[i], split, k_total, v_total, [i]) for i in range(n)]
        return Spend([p[0][i] for i, p in enumerate(picks)], [p[1][i] for i, p in enumerate(picks)])
    budget = round((1 - ratio) * sum(full))
    k_units, v_units = _greedy(k, v, budget, split, k_total, v_total, list(range(n)))
    return Spend([k_units[i] for i in range(n)], [v_units[i] for i in range(n)])
