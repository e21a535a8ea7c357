"""``clover latent``: one key and one value latent per layer shared by its heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (CalibOpt, CalibSeqlenOpt, DataOpt, DtypeOpt, EvalPplOpt, EvalTasksOpt, JsonOpt, MaxWindowsOpt,
                     ModelArg, OverwriteOpt, SeqlenOpt, TaskDirOpt, TaskLimitOpt, check_outputs, console)
from .prepare import load_calibrated, peek
from .report import before_after, print_summary, runs_of_equal, tasks_from_cli


def latent(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the latent model in.")],
    kv_ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1); 0 converts "
                                                 "exactly.")] = 0.0,
    rope: Annotated[str, typer.Option(help="How keys meet RoPE: latent (pre-RoPE key latent, rebuilt when "
                                           "attending), shared (rotary components shared across KV heads per "
                                           "frequency, exact, nothing rebuilt) or mix (both).")] = "latent",
    allocation: Annotated[str, typer.Option(help="global: one budget over all layers; uniform: the same cached "
                                                 "dims in every layer.")] = "global",
    split: Annotated[str, typer.Option(help="Weight of key error against value error: auto (chosen on held-out "
                                            "calibration windows) or a positive number.")] = "auto",
    shared_fraction: Annotated[float, typer.Option(help="--rope mix: share of each layer's key dims held as "
                                                        "shared rotary components.")] = 0.25,
    k_dims: Annotated[Optional[int], typer.Option(help="Fixed key dims per layer (with --v-dims, instead of "
                                                       "--kv-ratio).")] = None,
    v_dims: Annotated[Optional[int], typer.Option(help="Fixed value dims per layer.")] = None,
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (the last 4 choose the split).")] = 16,
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
    """Share one key latent and one value latent across each layer's heads: a KV cache cut across heads."""
    from ..latent import LatentConfig, to_latent
    from ..latent.convert import check_model
    from ..latent.families import family_for_type
    from ..save import save_model, write_json

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    try:
        split_value: str | float = split if split == "auto" else float(split)
    except ValueError:
        raise CloverError(f"--split {split!r}: use auto or a positive number") from None
    config = LatentConfig(kv_ratio=kv_ratio, rope=rope, allocation=allocation, split=split_value,
                          shared_fraction=shared_fraction, k_dims=k_dims, v_dims=v_dims)
    config.check()

    def check_config(peeked, _calib_seqlen: int) -> None:  # the family and the budget, from config.json alone
        family_for_type(peeked.model_type)
        config.check_against(peeked)

    peeked = peek(ctx, model, "latent conversion", calib_seqlen, eval_ppl, seqlen, check_config)
    task_config = tasks_from_cli(eval_tasks, task_limit, task_dir) if eval_tasks else None
    loaded, config.calibration, text, calib_note = load_calibrated(
        ctx, model, peeked, "latent conversion", dtype=dtype, calib=calib, calib_samples=calib_samples,
        eval_ppl=eval_ppl, data=data, check_loaded=lambda net, _: check_model(net))
    converted, report = to_latent(loaded.model, config)
    if calib_note:
        report.notes.append(calib_note)
    payload = before_after(model, report, loaded, converted, text, task_config, seqlen, max_windows)
    split_note = "" if report.split is None else f", key/value split {report.split:g}"
    table = Table(title=f"{model}: latent KV (--rope {report.rope}, {report.allocation}{split_note})")
    for col in ("layers", "key latent", "shared rotary components", "value latent", "cached dims / token"):
        table.add_column(col, justify="right")
    for layers, row in runs_of_equal(report.layers, lambda lr: (
            str(lr.k_rank), str(lr.shared_components), str(lr.v_rank), f"{lr.cached_before} -> {lr.cached_after}")):
        table.add_row(layers, *row)
    console.print(table)
    print_summary(report, payload)
    save_model(converted, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out} (loads with AutoModelForCausalLM.from_pretrained after `import clover`, or with "
                  "trust_remote_code=True without clover)")
    if json_path:
        write_json(json_path, payload)
