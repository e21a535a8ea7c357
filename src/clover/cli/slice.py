"""``clover slice``: SliceGPT's rotation and cut of the residual stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (CalibOpt, CalibSeqlenOpt, DataOpt, DtypeOpt, EvalPplOpt, EvalTasksOpt, JsonOpt, MaxWindowsOpt,
                     ModelArg, OverwriteOpt, SeqlenOpt, TaskDirOpt, TaskLimitOpt, check_calibration_size,
                     check_outputs, console)
from .prepare import load_calibrated, peek
from .report import before_after, loads_how, print_summary, tasks_from_cli


def slice_command(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the sliced model in.")],
    ratio: Annotated[float, typer.Option(help="Fraction of the hidden dimension removed, in [0, 1); 0 is the exact "
                                              "rotation alone.")] = 0.0,
    multiple_of: Annotated[int, typer.Option(help="Round the kept hidden width to a multiple of this (kernels "
                                                  "want 8; 1 keeps the exact count).")] = 8,
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    calib_seqlen: CalibSeqlenOpt = 512,
    eval_ppl: EvalPplOpt = False,
    seqlen: SeqlenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    data: DataOpt = None,
    eval_tasks: EvalTasksOpt = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Rotate the residual stream by its principal directions and delete the weakest (SliceGPT): every matrix that
    reads or writes the stream gets narrower."""
    from ..save import save_model, write_json
    from ..slicing import SliceConfig, slice_
    from ..slicing.families import check_config, check_width

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = SliceConfig(ratio=ratio, multiple_of=multiple_of)
    config.check()

    def config_rules(peeked_config, tokens: int) -> None:  # the family, the kept width, the calibration size
        check_config(peeked_config)
        check_width(peeked_config, config)
        check_calibration_size(peeked_config, calib_samples, tokens)

    peeked = peek(ctx, model, "slicing", calib_seqlen, eval_ppl, seqlen, config_rules)
    task_config = tasks_from_cli(eval_tasks, task_limit, task_dir) if eval_tasks else None
    loaded, config.calibration, text, calib_note = load_calibrated(
        ctx, model, peeked, "slicing", dtype=dtype, calib=calib, calib_samples=calib_samples, eval_ppl=eval_ppl,
        data=data, check_loaded=lambda net, tokens: config_rules(net.config, tokens))
    sliced, report = slice_(loaded.model, config)
    if calib_note:
        report.notes.append(calib_note)
    payload = before_after(model, report, loaded, sliced, text, task_config, seqlen, max_windows)
    table = Table(title=f"{model}: sliced ({report.runtime})")
    for col in ("hidden dims", "ratio applied", "stream energy kept", "rotation check (relative)"):
        table.add_column(col, justify="right")
    check = "-" if report.check is None else f"{report.check['relative_diff']:.1e} (tolerance " \
                                               f"{report.check['tolerance']:.0e})"
    table.add_row(f"{report.hidden_before} -> {report.hidden_after}", f"{report.ratio_applied:.4f}",
                  f"{report.energy_kept:.4f}", check)
    console.print(table)
    print_summary(report, payload)
    save_model(sliced, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out} ({loads_how(sliced)})")
    if json_path:
        write_json(json_path, payload)
