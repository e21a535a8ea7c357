"""``orthogonalize_``: rewrite every head so its dimensions are orthogonal and sorted by singular value.

The model's function is unchanged (checked against its own outputs before returning). Pairs that cannot be
rewritten exactly, i.e. Q-K under rotary embeddings, are skipped and reported as such, never approximated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, AttentionSite, adapter_for, model_type
from .errors import CloverError
from .pairs import PairKind, balanced, cast_like, check_finite, factors
from .verify import Check, compare, model_outputs

ROTARY_QK_REASON = (
    "rotary embeddings sit between Q and K, so their product depends on position and an SVD rewrite "
    "would not be exact; V-O is rewritten instead"
)


@dataclass
class OrthogonalizeConfig:
    """What to rewrite and how precisely. ``compute_dtype`` is for the SVD; weights go back in the model's dtype."""

    pairs: tuple[PairKind, ...] = ("qk", "vo")
    compute_dtype: torch.dtype = torch.float64
    verify: bool = True
    progress: bool = True


@dataclass
class PairResult:
    site: str
    layer: int
    role: str
    kind: PairKind
    status: Literal["rewritten", "skipped"]
    reason: str = ""
    singular_values: list[list[float]] = field(default_factory=list)  # per KV group, sorted


@dataclass
class OrthogonalizeReport:
    model_type: str
    adapter: str
    pairs: list[PairResult]
    check: Check | None = None

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "adapter": self.adapter,
            "pairs": [asdict(p) for p in self.pairs],
            "check": None if self.check is None else self.check.to_dict(),
        }

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pairs:
            key = f"{p.kind} {p.status}"
            out[key] = out.get(key, 0) + 1
        return out


def skip_reason(site: AttentionSite, kind: PairKind) -> str:
    """Why a pair cannot be rewritten exactly, or "" when it can."""
    if kind != "qk":
        return ""
    return ROTARY_QK_REASON if site.rotary else site.qk_inexact


def check_config(config: OrthogonalizeConfig) -> None:
    unknown = set(config.pairs) - {"qk", "vo"}
    if not config.pairs:
        raise CloverError("no pair to rewrite: pass --pairs qk, vo or qk,vo")
    if unknown:
        raise CloverError(f"unknown pair kind(s) {sorted(unknown)}: use 'qk' and/or 'vo'")


def orthogonalize_site(adapter: Adapter, site: AttentionSite, config: OrthogonalizeConfig
                       ) -> tuple[list[PairResult], dict[PairKind, tuple[torch.Tensor, torch.Tensor]]]:
    """Rewrite one block in place; returns its results and the original factors ``{kind: (left, right)}`` whose
    products the rewritten weights must reproduce (clover.streaming checks them block by block)."""
    weights = adapter.read(site)
    check_finite(weights, site)
    new = weights
    results, products = [], {}
    for kind in config.pairs:
        reason = skip_reason(site, kind)
        if reason:
            results.append(PairResult(site.name, site.layer, site.role, kind, "skipped", reason))
            continue
        left, right = factors(new, kind)
        products[kind] = (left.clone(), right.clone())  # views of the weights, which the write overwrites
        new, s = balanced(new, kind, config.compute_dtype)
        results.append(PairResult(site.name, site.layer, site.role, kind, "rewritten", singular_values=s.tolist()))
    adapter.write(site, cast_like(new, weights))
    return results, products


def orthogonalize_(model: nn.Module, config: OrthogonalizeConfig | None = None) -> OrthogonalizeReport:
    """Rewrite ``model`` in place; raises ``CloverError`` if the lossless check fails."""
    config = config or OrthogonalizeConfig()
    check_config(config)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise CloverError(f"no attention blocks found in this {model_type(model)} model: is it a full model?")

    inputs = adapter.example_inputs(model) if config.verify else None
    reference = model_outputs(model, inputs) if config.verify else None

    results: list[PairResult] = []
    for site in tqdm(sites, desc="orthogonalize", unit="block", disable=not config.progress):
        results += orthogonalize_site(adapter, site, config)[0]

    report = OrthogonalizeReport(model_type(model), adapter.name, results)
    if config.verify:
        report.check = compare(reference, model, inputs)
        if not report.check.passed:
            raise CloverError(
                f"lossless check failed: outputs moved by {report.check.relative_diff:.2e} of their scale "
                f"(tolerance {report.check.tolerance:.0e}); the model's dtype may be too coarse, load it in float32"
            )
    return report
