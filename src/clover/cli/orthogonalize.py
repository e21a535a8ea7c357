"""``clover orthogonalize``: the lossless CLOVER rewrite, checked against the original logits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (DtypeOpt, JsonOpt, ModelArg, StreamOpt, check_outputs, comma_list, console, load, streams,
                     torch_dtype)


def orthogonalize(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the rewritten model in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    pairs: Annotated[str, typer.Option(help="Pairs to rewrite: qk, vo or qk,vo.")] = "qk,vo",
    compute_dtype: Annotated[str, typer.Option(help="SVD precision: float64 or float32.")] = "float64",
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
    stream: StreamOpt = None,
):
    """Rewrite every head so its dims are orthogonal and sorted by singular value; prove nothing changed; save."""
    import torch

    from ..orthogonalize import OrthogonalizeConfig, check_config, orthogonalize_
    from ..save import save_model, write_json

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    if compute_dtype not in ("float64", "float32"):
        raise CloverError(f"unknown --compute-dtype {compute_dtype!r}: use float64 or float32")
    kinds = comma_list(pairs)
    check_config(OrthogonalizeConfig(pairs=kinds))
    if streams(model, stream):
        from ..streaming import StreamOptions, stream_orthogonalize

        report = stream_orthogonalize(model, out, OrthogonalizeConfig(pairs=kinds, compute_dtype=getattr(
            torch, compute_dtype)), StreamOptions(dtype=torch_dtype(dtype), overwrite=overwrite))
        counts = {f"{k} {st}": sum(p["kind"] == k and p["status"] == st for p in report["pairs"])
                  for k in kinds for st in ("rewritten", "skipped")}
        console.print(f"streamed layer by layer: {counts}; every block's products checked against the original; "
                      f"saved to {out}")
        if json_path:
            write_json(json_path, report)
        return
    loaded = load(model, dtype)
    report = orthogonalize_(loaded.model, OrthogonalizeConfig(pairs=kinds, compute_dtype=getattr(torch, compute_dtype)))

    table = Table(title=f"{model}: orthogonalized")
    for col in ("pair", "blocks rewritten", "blocks skipped", "why skipped"):
        table.add_column(col)
    for kind in kinds:
        done = [p for p in report.pairs if p.kind == kind and p.status == "rewritten"]
        skipped = [p for p in report.pairs if p.kind == kind and p.status == "skipped"]
        reasons = sorted({p.reason for p in skipped})
        table.add_row({"qk": "Q-K", "vo": "V-O"}.get(kind, kind), str(len(done)), str(len(skipped)), "; ".join(reasons))
    console.print(table)
    check = report.check
    console.print(f"lossless check: max |logit diff| = {check.max_abs_diff:.3e}, "
                  f"logit scale = {check.logit_scale:.3e}, "
                  f"relative = {check.relative_diff:.3e} (tolerance {check.tolerance:.0e}) -> "
                  + ("[green]PASSED[/]" if check.passed else "[red]FAILED[/]"))
    payload = {"model": model, **report.to_dict()}
    save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out}")
    if json_path:
        write_json(json_path, payload)
