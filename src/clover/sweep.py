"""Perplexity (and, on request, lm-eval task accuracy) against pruning ratio for several criteria: one base model,
many prunes, one picture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import perplexity
from .prune import PruneConfig, prune
from .tasks import TaskConfig, evaluate_tasks


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
              calibration: torch.Tensor | None = None, seqlen: int = 512, max_windows: int | None = 40,
              tasks: TaskConfig | None = None) -> dict:
    """``tasks``: also score the base and every prune on these lm-eval tasks (same harness options for all)."""
    def ppl(m: nn.Module) -> float:
        return perplexity(m, tokenizer, text, seqlen=seqlen, max_windows=max_windows, progress=False).ppl

    def accuracy(m: nn.Module) -> dict:
        return evaluate_tasks(m, tokenizer, tasks).to_dict()

    base = ppl(model)
    table: dict[str, dict[str, float]] = {c: {} for c in criteria}
    scored: dict[str, dict[str, dict]] = {c: {} for c in criteria}
    kv: dict[str, float] = {}
    runs = [(c, r) for c in criteria for r in ratios]
    for criterion, ratio in tqdm(runs, desc=f"sweep {pair}", unit="prune"):
        pruned, report = prune(model, sweep_config(criterion, ratio, pair, qk_criterion, allocation, calibration))
        table[criterion][str(ratio)] = ppl(pruned)
        if tasks is not None:
            scored[criterion][str(ratio)] = accuracy(pruned)
        kv[str(ratio)] = report.kv_bytes_per_token_after / report.kv_bytes_per_token_before
        del pruned
    result = {"pair": pair, "ratios": list(ratios), "criteria": list(criteria), "allocation": allocation,
              "base_ppl": base, "ppl": table, "kv_cache_fraction": kv,
              "protocol": {"seqlen": seqlen, "max_windows": max_windows, "split": "test"},
              "calibration_tokens": 0 if calibration is None else int(calibration.numel())}
    if tasks is not None:
        result["base_tasks"], result["tasks"] = accuracy(model), scored
    return result


def plot_sweep(result: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tasks = "tasks" in result
    fig, axes = plt.subplots(1, 2 if with_tasks else 1, figsize=(12 if with_tasks else 6, 4.2), squeeze=False)
    ax = axes[0][0]
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
    if with_tasks:
        acc = axes[0][1]
        for criterion in result["criteria"]:
            points = result["tasks"][criterion]
            acc.plot([float(r) for r in points], [p["average"] for p in points.values()], marker="o",
                     label=criterion)
        base = result["base_tasks"]["average"]
        acc.axhline(base, color="gray", ls="--", lw=1, label=f"unpruned ({base:.3f})")
        acc.set_xlabel("fraction of head dims removed")
        acc.set_ylabel("average task accuracy (acc_norm, else acc)")
        acc.grid(alpha=0.3)
        acc.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
