"""``clover slice``: SliceGPT's rotation and cut of the residual stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (CalibOpt, CalibSeqlenOpt, DataOpt, DtypeOpt, EvalPplOpt, EvalTasksOpt, JsonOpt, MaxWindowsOpt,
                     ModelArg, OverwriteOpt, SeqlenOpt, TaskDirOpt, TaskLimitOpt, calibration_rows,
                     calibration_windows, check_calibration_size, check_model_fits, check_outputs, console,
                     default_calib_seqlen, load)
from .report import loads_how, before_after, print_summary, tasks_from_cli, test_text


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
    from ..preflight import read_config
    from ..save import save_model, write_json
    from ..slicing import SliceConfig, slice_
    from ..slicing.families import check_config, check_width

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = SliceConfig(ratio=ratio, multiple_of=multiple_of)
    config.check()
    peeked = read_config(model)
    calib_seqlen, calib_note = default_calib_seqlen(ctx, peeked, calib_seqlen)
    seqlens = {"--calib-seqlen": calib_seqlen, **({"--seqlen": seqlen} if eval_ppl else {})}
    if peeked is not None:  # the family, the lengths, the kept width and the calibration size, from config.json
        check_config(peeked)
        check_model_fits(peeked, model, seqlens, "slicing")
        check_width(peeked, config)
        check_calibration_size(peeked, calib_samples, calib_seqlen)
    task_config = tasks_from_cli(eval_tasks, task_limit, task_dir) if eval_tasks else None
    text = test_text(eval_ppl, data)
    calibration_rows(model, calib)
    loaded = load(model, dtype)
    check_config(loaded.model.config)
    if peeked is None:
        calib_seqlen, calib_note = default_calib_seqlen(ctx, loaded.model, calib_seqlen)
        seqlens["--calib-seqlen"] = calib_seqlen
    check_model_fits(loaded.model, model, seqlens, "slicing")
    check_calibration_size(loaded.model.config, calib_samples, calib_seqlen)
    config.calibration = calibration_windows(loaded, calib, calib_samples, calib_seqlen)
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
