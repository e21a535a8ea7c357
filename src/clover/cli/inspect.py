"""``clover inspect``: each head's Q-K and V-O spectrum."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import DtypeOpt, JsonOpt, ModelArg, check_outputs, console, load
from .report import stack_name


def _ranks_cell(ranks: list[int]) -> str:
    """Per-head counts when there are few heads, else min / median / max."""
    if len(ranks) <= 4:
        return ",".join(map(str, ranks))
    return f"{min(ranks)} / {statistics.median(ranks):g} / {max(ranks)}"


def inspect(
    model: ModelArg,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of normalised spectra per layer.")] = None,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Singular values of every head's Q-K and V-O pair, and how many directions hold 90% / 99% of each."""
    from ..save import write_json
    from ..spectra import collect_spectra, plot_spectra, spectra_to_json

    check_outputs(model, json_path=json_path, plot=plot)
    loaded = load(model, dtype)
    rows = collect_spectra(loaded.model)
    head_dim = {r.kind: len(r.singular_values[0]) for r in rows}
    many = len(rows[0].singular_values) > 4
    table = Table(title=f"{model}: directions holding 90% / 99% of each head's squared spectrum"
                  + (" (min / median / max over heads)" if many else " (per KV group)"))
    for col in ("layer", "block", f"Q-K 90% (of {head_dim['qk']})", "Q-K 99%",
                f"V-O 90% (of {head_dim['vo']})", "V-O 99%"):
        table.add_column(col, justify="right" if col != "block" else "left")
    by_site: dict[str, dict] = {}
    several = len({stack_name(r) for r in rows}) > 1  # several attention stacks (Mllama): name the stack
    for r in rows:
        layer = f"{stack_name(r)} {r.layer}" if several else str(r.layer)
        by_site.setdefault(r.site, {"layer": layer, "role": r.stack or r.role})[r.kind] = r
    for site in by_site.values():
        qk, vo = site["qk"], site["vo"]
        qk_note = "" if qk.exact else "*"
        table.add_row(site["layer"], site["role"],
                      _ranks_cell(qk.energy_ranks(0.90)) + qk_note, _ranks_cell(qk.energy_ranks(0.99)) + qk_note,
                      _ranks_cell(vo.energy_ranks(0.90)), _ranks_cell(vo.energy_ranks(0.99)))
    console.print(table)
    if not all(r.exact for r in rows):
        console.print("* rotary embeddings (or a norm on q and k, as in Mllama's cross-attention) sit between Q and "
                      "K: this Q-K spectrum is of the product W_q W_k^T alone and is not an exact CLOVER pair "
                      "(V-O is).")
    if plot:
        plot_spectra(rows, str(plot), title=model)
        console.print(f"spectra plot written to {plot}")
    if json_path:
        write_json(json_path, {"model": model, "pairs": spectra_to_json(rows)})
        console.print(f"JSON written to {json_path}")
