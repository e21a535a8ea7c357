"""``clover sweep``: perplexity against pruning ratio, one curve per criterion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (DtypeOpt, JsonOpt, ModelArg, TaskDirOpt, TaskLimitOpt, calibration_rows, calibration_windows,
                     check_model_fits, check_outputs, console, default_calib_seqlen, load, needs_calibration,
                     refuse_perplexity)
from .report import tasks_from_cli


def _parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            ratios.append(float(part))
        except ValueError:
            raise CloverError(f"--ratios {text!r}: {part!r} is not a number; pass fractions such as 0.125,0.25,0.5") \
                from None
    if not ratios:
        raise CloverError("--ratios is empty: pass fractions such as 0.125,0.25,0.5")
    return ratios


def sweep(
    ctx: typer.Context,
    model: ModelArg,
    pair: Annotated[str, typer.Option(help="Which pair to prune: qk, vo or both.")] = "vo",
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios of head dims removed.")] = "0.125,0.25,0.5",
    criteria: Annotated[str, typer.Option(help="Comma-separated criteria to compare.")] = "vanilla,clover,whitened",
    qk_criterion: Annotated[Optional[str], typer.Option(help="Q-K criterion when --pair both on a rotary model.")]
    = None,
    allocation: Annotated[str, typer.Option(help="uniform or global.")] = "uniform",
    calib: Annotated[Optional[Path], typer.Option(help="Calibration corpus folder.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seqlen: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Perplexity on the first N windows only.")] = 40,
    data: Annotated[Optional[Path], typer.Option(help="Evaluation corpus folder.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of perplexity against ratio per criterion.")] = None,
    eval_tasks: Annotated[Optional[str], typer.Option(help="Also score lm-eval task accuracy (comma-separated "
                                                           "task names) for the base and every prune.")] = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Perplexity against pruning ratio for each criterion (the picture that says which criterion to trust)."""
    from ..data import load_text
    from ..save import write_json
    from ..preflight import read_config
    from ..prune import check_units
    from ..ranks import check_ratio
    from ..sweep import plot_sweep, run_sweep

    check_outputs(model, json_path=json_path, plot=plot)
    if pair not in ("qk", "vo", "both"):
        raise CloverError(f"unknown --pair {pair!r}: use qk, vo or both")
    refuse_perplexity(model, "clover sweep (perplexity against ratio)")
    ratio_list = _parse_ratios(ratios)
    for ratio in ratio_list:
        check_ratio(ratio, "--ratios entry")
        if ratio == 0:
            raise CloverError("--ratios entry 0 prunes nothing (the base model is always measured): drop it")
    criteria_list = [c.strip() for c in criteria.split(",") if c.strip()]
    if not criteria_list:
        raise CloverError("--criteria is empty: pass some of vanilla, clover, whitened")
    calibrates = needs_calibration(*criteria_list, qk_criterion)
    peeked = read_config(model)
    calib_seqlen, calib_note = default_calib_seqlen(ctx, peeked, calib_seqlen)
    seqlens = {"--seqlen": seqlen, **({"--calib-seqlen": calib_seqlen} if calibrates else {})}
    what = "clover sweep (next-token perplexity)"
    check_model_fits(peeked, model, seqlens, what)
    if peeked is not None:  # every ratio against the heads' widths, before any weights load
        for ratio in ratio_list:
            for criterion in criteria_list:
                for kind in (("qk", "vo") if pair == "both" else (pair,)):
                    check_units(peeked, kind, ratio, (qk_criterion or criterion) if kind == "qk" else criterion,
                                allocation, "--ratios entry")
    task_config = tasks_from_cli(eval_tasks, task_limit, task_dir) if eval_tasks else None
    text = load_text(corpus="wikitext2", split="test", data=data)
    if calibrates:
        calibration_rows(model, calib)
    loaded = load(model, dtype)
    if peeked is None and calibrates:
        calib_seqlen, calib_note = default_calib_seqlen(ctx, loaded.model, calib_seqlen)
        seqlens["--calib-seqlen"] = calib_seqlen
    check_model_fits(loaded.model, model, seqlens, what)
    calibration = None
    if calibrates:
        calibration = calibration_windows(loaded, calib, calib_samples, calib_seqlen)
    result = run_sweep(loaded.model, loaded.tokenizer, text, pair=pair, ratios=ratio_list, criteria=criteria_list,
                       qk_criterion=qk_criterion, allocation=allocation, calibration=calibration, seqlen=seqlen,
                       max_windows=max_windows, tasks=task_config)
    if calib_note:
        result["notes"] = [calib_note]
    base_acc = f", average task accuracy {result['base_tasks']['average']:.4f}" if task_config else ""
    table = Table(title=f"{model}: WikiText-2 test ppl{' / task accuracy' if task_config else ''}, {pair} pruned "
                        f"(base {result['base_ppl']:.3f}{base_acc})")
    table.add_column("ratio", justify="right")
    for c in criteria_list:
        table.add_column(c, justify="right")
    for ratio in ratio_list:
        cells = []
        for c in criteria_list:
            cell = f"{result['ppl'][c][str(ratio)]:.3f}"
            if task_config:
                cell += f" / {result['tasks'][c][str(ratio)]['average']:.4f}"
            cells.append(cell)
        table.add_row(f"{ratio:g}", *cells)
    console.print(table)
    if calib_note:
        console.print(f"note: {calib_note}")
    if plot:
        plot_sweep(result, str(plot), title=f"{model}: {pair} pruning")
        console.print(f"plot written to {plot}")
    if json_path:
        write_json(json_path, {"model": model, **result})
