"""SliceGPT-style hidden slicing and CLOVER on top, on SmolLM2-135M, against each alone at equal parameters.

    python benchmarks/slice_clover.py [--windows 40] [--seqlen 512] [--calib-samples 32] [--json ...]

Rows: the base; CLOVER alone (V-O 50%, then V-O 50% + Q-K 50% by rotary-activation pairs, the best rotary option in
``prune_levers``); slicing 6.25% and 12.5% alone and with the same CLOVER prunes on top (slice -> prune). Then the
controls at equal parameters for every slice + CLOVER model: CLOVER alone with Q-K and V-O ratios raised until the
parameter count matches, and slicing alone with the width whose parameter count matches (``--multiple-of 1``).
The slicing ratios are applied exactly (``multiple_of=4``: 540 and 504 of 576 dims). Calibration: WikiText-2
validation windows (the same ids for slicing and for pruning); evaluation: the test split. Prints a table, writes
JSON, updates the ``slice_clover`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
except ImportError:  # pragma: no cover - imported as benchmarks._report
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json

from clover.data import calibration_batches, load_rows, load_text
from clover.evaluate import perplexity
from clover.models import load
from clover.prune import PruneConfig, kv_bytes_per_token, parameter_count, prune
from clover.slicing import SliceConfig, slice_

SLICES = (0.0625, 0.125)
VO = dict(vo_ratio=0.5, criterion="whitened")
BOTH = dict(vo_ratio=0.5, qk_ratio=0.5, criterion="whitened", qk_criterion="rotary-activation")
ON_TOP = {"V-O 50%": VO, "V-O 50% + Q-K 50%": BOTH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--data", default=None, help="folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA)")
    parser.add_argument("--json", default="benchmarks/results/slice_clover.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    info = machine_info()
    lm = load("smollm2-135m")
    text = load_text(split="test", data=args.data)
    calib = calibration_batches(lm.tokenizer, load_rows(split="validation", data=args.data), args.calib_samples, 512)
    results: list[dict] = []

    def record(method: str, model, seconds: float, **extra) -> dict:
        value = perplexity(model, lm.tokenizer, text, seqlen=args.seqlen, max_windows=args.windows,
                           progress=False).ppl
        row = {"method": method, "params": parameter_count(model), "hidden": model.config.hidden_size,
               "kv_bytes_per_token": kv_bytes_per_token(model), "ppl": value, "seconds": seconds, **extra}
        results.append(row)
        print(f"{method}: {row['params']:,} params, ppl {value:.2f}", flush=True)
        return row

    def clover(model, settings: dict):
        start = time.perf_counter()
        pruned, _ = prune(model, PruneConfig(**settings, calibration=calib, progress=False))
        return pruned, time.perf_counter() - start

    def sliced(ratio: float, multiple_of: int):
        start = time.perf_counter()
        model, report = slice_(lm.model, SliceConfig(ratio=ratio, calibration=calib, multiple_of=multiple_of,
                                                     progress=False))
        return model, report, time.perf_counter() - start

    base = record("base", lm.model, 0.0, kind="base")
    alone = {}
    for name, settings in ON_TOP.items():
        model, seconds = clover(lm.model, settings)
        alone[name] = record(f"CLOVER {name}", model, seconds, kind="clover")
        del model
    combos = []
    for ratio in SLICES:
        model, report, seconds = sliced(ratio, 4)
        record(f"slice {ratio:.2%}", model, seconds, kind="slice", slice_ratio=ratio, energy_kept=report.energy_kept)
        for name, settings in ON_TOP.items():
            pruned, more = clover(model, settings)
            combos.append(record(f"slice {ratio:.2%} + CLOVER {name}", pruned, seconds + more, kind="slice+clover",
                                 slice_ratio=ratio, on_top=name))
            del pruned
        del model

    # Equal-parameter controls. CLOVER removes parameters linearly in its ratios (per-layer Q-K by rotary pairs,
    # V-O by head dims), so the ratio r for Q-K = V-O = r follows from the V-O 50% + Q-K 50% prune alone.
    removed_at_half = base["params"] - alone["V-O 50% + Q-K 50%"]["params"]
    slice_rows = [r for r in results if r["kind"] == "slice"]
    per_dim = (slice_rows[0]["params"] - slice_rows[1]["params"]) / (slice_rows[0]["hidden"] - slice_rows[1]["hidden"])
    for combo in combos:
        target = combo["params"]
        r = (base["params"] - target) / (2 * removed_at_half)
        if r < 0.99:
            model, seconds = clover(lm.model, dict(BOTH, vo_ratio=r, qk_ratio=r))
            record(f"CLOVER alone, Q-K = V-O {r:.1%} (matches {combo['method']})", model, seconds,
                   kind="clover-matched", matches=combo["method"])
            del model
        else:
            results.append({"method": f"CLOVER alone cannot reach {target:,} params (needs Q-K = V-O {r:.0%})",
                            "kind": "clover-matched", "matches": combo["method"], "params": None, "ppl": None,
                            "hidden": 576, "kv_bytes_per_token": None, "seconds": 0.0})
        width = round(slice_rows[1]["hidden"] - (slice_rows[1]["params"] - target) / per_dim)
        model, report, seconds = sliced(1 - width / 576, 1)
        record(f"slice alone to {width} dims (matches {combo['method']})", model, seconds, kind="slice-matched",
               matches=combo["method"], slice_ratio=report.ratio_applied)
        del model

    columns = ["method", "hidden", "params", "params / base", "KV bytes / token", "ppl", "x base"]

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table = [[r["method"], r["hidden"], cell(r["params"], ","),
              cell(None if r["params"] is None else r["params"] / base["params"], ".3f"),
              cell(r["kv_bytes_per_token"], ","), cell(r["ppl"], ".2f"),
              cell(None if r["ppl"] is None else r["ppl"] / base["ppl"], ".3f")] for r in results]
    print_table(f"SmolLM2-135M, WikiText-2 test ppl ({args.windows} x {args.seqlen})", columns, table)

    verdicts = []
    for combo in combos:
        controls = [r for r in results if r.get("matches") == combo["method"]]
        beaten = [c for c in controls if c["ppl"] is None or combo["ppl"] < c["ppl"]]
        names = "; ".join(f"{c['method']}: " + ("-" if c["ppl"] is None else f"{c['ppl']:.2f}") for c in controls)
        verdicts.append({"combo": combo["method"], "ppl": combo["ppl"], "beats_both": len(beaten) == len(controls),
                         "controls": names})
    goal_rows = [v for v in verdicts if v["combo"].startswith("slice 12.50% + CLOVER V-O 50%")
                 and "Q-K" not in v["combo"]]
    goals = [f"slice 12.5% + CLOVER V-O 50% ({v['ppl']:.2f}) beats either alone at equal parameters ({v['controls']}): "
             f"{'MET' if v['beats_both'] else 'NOT MET'}" for v in goal_rows]
    others = [f"{v['combo']} ({v['ppl']:.2f}) vs {v['controls']}: "
              + ("beats both" if v["beats_both"] else "does not beat both") for v in verdicts if v not in goal_rows]
    for line in goals + others:
        print("-", line)
    payload = {"machine": info, "windows": args.windows, "seqlen": args.seqlen, "calib_samples": args.calib_samples,
               "results": results, "verdicts": verdicts, "goals": goals}
    write_json(args.json, payload)
    if not args.no_md:
        command = (f"python benchmarks/slice_clover.py --windows {args.windows} --seqlen {args.seqlen} "
                   f"--calib-samples {args.calib_samples}")
        md = (f"Command: `{command}`\n\nMachine: {machine_line(info)}\n\n"
              f"SmolLM2-135M, WikiText-2 test perplexity on {args.windows} windows x {args.seqlen} tokens; calibration "
              f"{args.calib_samples} WikiText-2 validation windows of 512 tokens (the same for slicing and pruning). "
              "Slicing is one PCA rotation of the residual stream (the tied head keeps one table; a 504 x 504 or 540 x "
              "540 map carries the final norm). CLOVER on top is `prune` of the sliced model (whitened V-O; Q-K by "
              "rotary-activation pairs). Controls are at equal parameters: CLOVER alone with Q-K = V-O raised to the "
              "same count, and slicing alone to the width with the same count. Slicing leaves the KV cache as it is; "
              "CLOVER V-O (and Q-K) shrink it. Wall times per model are in the JSON.\n\n"
              + markdown_table(columns, table) + "\n\n" + "\n".join(f"- goal: {g}" for g in goals) + "\n"
              + "\n".join(f"- {o}" for o in others) + "\n")
        update_benchmarks_md("slice_clover", md)


if __name__ == "__main__":
    main()
