"""Perplexity against pruning ratio for several criteria: one base model, many prunes, one picture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import perplexity
from .prune import PruneConfig, prune


def sweep_config(criterion: str, ratio: float, pair: str, qk_criterion: str | None, allocation: str,
                 calibration: torch.Tensor | None) -> PruneConfig:
    """The criterion applies to the swept pair(s); for ``both``, ``qk_criterion`` may override it for Q-K."""
    if pair == "qk":
        return PruneConfig(qk_ratio=ratio, qk_criterion=criterion, allocation=allocation, calibration=calibration,
                           progress=False)
    if pair == "vo":
        return PruneConfig(vo_ratio=ratio, criterion=criterion, allocation=allocation, calibration=calibration,
                           progress=False)
    return PruneConfig(qk_ratio=ratio, vo_ratio=ratio, criterion=criterion, qk_criterion=qk_criterion,
                       allocation=allocation, calibration=calibration, progress=False)


def run_sweep(model: nn.Module, tokenizer, text: str, *, pair: str, ratios: Sequence[float],
              criteria: Sequence[str], qk_criterion: str | None = None, allocation: str = "uniform",
              calibration: torch.Tensor | None = None, seqlen: int = 512, max_windows: int | None = 40) -> dict:
    def ppl(m: nn.Module) -> float:
        return perplexity(m, tokenizer, text, seqlen=seqlen, max_windows=max_windows, progress=False).ppl

    base = ppl(model)
    table: dict[str, dict[str, float]] = {c: {} for c in criteria}
    kv: dict[str, float] = {}
    runs = [(c, r) for c in criteria for r in ratios]
    for criterion, ratio in tqdm(runs, desc=f"sweep {pair}", unit="prune"):
        pruned, report = prune(model, sweep_config(criterion, ratio, pair, qk_criterion, allocation, calibration))
        table[criterion][str(ratio)] = ppl(pruned)
        kv[str(ratio)] = report.kv_bytes_per_token_after / report.kv_bytes_per_token_before
        del pruned
    return {"pair": pair, "ratios": list(ratios), "criteria": list(criteria), "allocation": allocation,
            "base_ppl": base, "ppl": table, "kv_cache_fraction": kv,
            "protocol": {"seqlen": seqlen, "max_windows": max_windows, "split": "test"},
            "calibration_tokens": 0 if calibration is None else int(calibration.numel())}


def plot_sweep(result: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for criterion in result["criteria"]:
        points = result["ppl"][criterion]
        xs = [float(r) for r in points]
        ax.plot(xs, list(points.values()), marker="o", label=criterion)
    ax.axhline(result["base_ppl"], color="gray", ls="--", lw=1, label=f"unpruned ({result['base_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of head dims removed")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
