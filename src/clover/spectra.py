"""Where the redundancy sits: singular values of every head's Q-K and V-O pair, without changing the model.

The count of directions that carry 90% / 99% of a head's squared spectrum is the first thing a practitioner
wants before pruning: it says how many head dims each layer really uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .decompose import spectrum
from .orthogonalize import skip_reason
from .pairs import PairKind, check_finite, factors

ENERGY_LEVELS = (0.90, 0.99)


@dataclass
class PairSpectrum:
    site: str
    layer: int
    role: str
    kind: PairKind
    exact: bool  # False: Q-K under rotary embeddings (the spectrum is of the position-free product only)
    singular_values: list[list[float]]  # per KV group, descending
    stack: str = ""  # encoder / decoder / cross in models with several stacks of blocks (Whisper)

    def energy_ranks(self, level: float) -> list[int]:
        return [energy_rank(torch.tensor(s), level) for s in self.singular_values]


def energy_rank(s: torch.Tensor, level: float) -> int:
    """Smallest k such that the top-k singular values hold ``level`` of the squared spectrum."""
    energy = s.double().pow(2)
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = energy.cumsum(0) / total
    return int((cumulative < level - 1e-12).sum().item()) + 1


def collect_spectra(model: nn.Module, compute_dtype: torch.dtype = torch.float64,
                    progress: bool = True) -> list[PairSpectrum]:
    adapter = adapter_for(model)
    rows: list[PairSpectrum] = []
    for site in tqdm(adapter.sites(model), desc="spectra", unit="block", disable=not progress):
        weights = adapter.read(site)
        check_finite(weights, site)
        for kind in ("qk", "vo"):
            s = spectrum(*factors(weights, kind), compute_dtype=compute_dtype)
            rows.append(PairSpectrum(site.name, site.layer, site.role, kind, not skip_reason(site, kind), s.tolist(),
                                    site.stack))
    return rows


def spectra_to_json(rows: list[PairSpectrum]) -> list[dict]:
    out = []
    for r in rows:
        item = asdict(r)
        for level in ENERGY_LEVELS:
            item[f"rank_{round(level * 100)}"] = r.energy_ranks(level)
        out.append(item)
    return out


def plot_spectra(rows: list[PairSpectrum], path: str, title: str = "") -> None:
    """Normalised spectra (s / s_max, averaged over heads) per layer, one panel per pair kind and role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.role, r.kind) for r in rows}, key=lambda rk: (rk[0] != "self", rk[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    layers = sorted({r.layer for r in rows})
    cmap = plt.get_cmap("viridis")
    for ax, (role, kind) in zip(axes[0], panels, strict=True):
        chosen = [r for r in rows if r.kind == kind and r.role == role]
        for r in chosen:
            s = torch.tensor(r.singular_values, dtype=torch.float64)
            normalised = (s / s[:, :1].clamp_min(1e-30)).mean(0)
            color = cmap(layers.index(r.layer) / max(len(layers) - 1, 1))
            ax.semilogy(range(1, len(normalised) + 1), normalised.clamp_min(1e-8).numpy(), color=color, lw=1)
        exact = all(r.exact for r in chosen)
        label = {"qk": "Q-K", "vo": "V-O"}[kind] + ("" if role == "self" else f" ({role})")
        ax.set_title(label + ("" if exact else "  [rotary: not an exact pair]"))
        ax.set_xlabel("direction (sorted)")
        ax.set_ylabel("singular value / largest (mean over heads)")
        ax.grid(alpha=0.3, which="both")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers)))
    fig.colorbar(sm, ax=axes[0].tolist(), label="layer")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
