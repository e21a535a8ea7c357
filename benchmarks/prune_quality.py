"""Perplexity after training-free pruning of SmolLM2-135M: the issue's criteria table, redone with clover.

    python benchmarks/prune_quality.py [--windows 40] [--seqlen 512] [--calib-samples 16]

Protocol of the prototype it checks against: WikiText-2 test, ``--windows`` non-overlapping windows of
``--seqlen`` tokens; data-aware criteria calibrated on WikiText-2 validation (``--calib-samples`` x 512 tokens);
uniform ratio in every layer, per KV group. Columns:

- V-O ``vanilla`` (original dims ranked by norm product), ``clover`` (SVD of the product), ``whitened`` with the
  layer input (the prototype's data-aware CLOVER) and ``whitened`` with the attention-mixed values plus a per-head
  O refit (clover's default);
- Q-K by rotary frequency pairs (SmolLM2 has RoPE, so no exact Q-K basis exists), by weight or activation norms.

Then Q-K and V-O together (the KV cache shrinks by the same fraction), uniform and global allocation. The
prototype's numbers from the issue are printed beside ours for comparison; they are reference values, not results
of this script. Prints tables, writes JSON, updates the ``prune_quality`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
except ImportError:  # pragma: no cover - imported as benchmarks._report
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json

from clover.data import calibration_batches, load_rows, load_text
from clover.evaluate import perplexity
from clover.models import load
from clover.prune import PruneConfig, prune

RATIOS = (0.125, 0.25, 0.5)
# column -> PruneConfig settings for one ratio r
SINGLE = {
    "V-O vanilla": lambda r: dict(vo_ratio=r, criterion="vanilla"),
    "V-O clover": lambda r: dict(vo_ratio=r, criterion="clover"),
    "V-O whitened (input)": lambda r: dict(vo_ratio=r, criterion="whitened", vo_whitening="input"),
    "V-O whitened (mixed + refit)": lambda r: dict(vo_ratio=r, criterion="whitened"),
    "Q-K rotary-weight": lambda r: dict(qk_ratio=r, qk_criterion="rotary-weight"),
    "Q-K rotary-activation": lambda r: dict(qk_ratio=r, qk_criterion="rotary-activation"),
}
# The prototype table (ppl), by column and ratio: what "within noise or better" is judged against.
PROTOTYPE = {
    "V-O vanilla": {0.125: 16814, 0.25: 41974, 0.5: 97451},
    "V-O clover": {0.125: 1240, 0.25: 3858, 0.5: 20342},
    "V-O whitened (input)": {0.125: 32.4, 0.25: 35.6, 0.5: 47.6},
    "Q-K rotary-weight": {0.125: 1309, 0.25: 2843, 0.5: 1722},
    "Q-K rotary-activation": {0.125: 30.1, 0.25: 33.4, 0.5: 51.6},
}
PROTOTYPE_BASE = 29.19
BOTH = {
    "uniform": lambda r: dict(qk_ratio=r, vo_ratio=r, criterion="whitened", qk_criterion="rotary-activation"),
    "global": lambda r: dict(qk_ratio=r, vo_ratio=r, criterion="whitened", qk_criterion="rotary-activation",
                             allocation="global"),
}
BOTH_RATIOS = (0.25, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--data", default=None, help="folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA)")
    parser.add_argument("--json", default="benchmarks/results/prune_quality.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    info = machine_info()
    lm = load("smollm2-135m")
    text = load_text(split="test", data=args.data)
    calibration = calibration_batches(lm.tokenizer, load_rows(split="validation", data=args.data),
                                      args.calib_samples, 512)

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, text, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl

    def run(settings: dict) -> dict:
        start = time.perf_counter()
        pruned, report = prune(lm.model, PruneConfig(**settings, calibration=calibration, progress=False))
        seconds = time.perf_counter() - start
        out = {"ppl": ppl(pruned), "prune_seconds": seconds,
               "kv_fraction": report.kv_bytes_per_token_after / report.kv_bytes_per_token_before,
               "params_fraction": report.params_after / report.params_before,
               "ranks": [[lr.qk_dim, lr.vo_dim] for lr in report.layers]}
        del pruned
        return out

    base = ppl(lm.model)
    jobs = [("single", col, r) for col in SINGLE for r in RATIOS] + [("both", a, r) for a in BOTH for r in BOTH_RATIOS]
    results: dict = {"single": {c: {} for c in SINGLE}, "both": {a: {} for a in BOTH}}
    for table, column, ratio in tqdm(jobs, desc="prune + eval", unit="run"):
        settings = (SINGLE if table == "single" else BOTH)[column](ratio)
        results[table][column][str(ratio)] = run(settings)

    def cell(column: str, ratio: float) -> str:
        ours = results["single"][column][str(ratio)]["ppl"]
        ref = PROTOTYPE.get(column, {}).get(ratio)
        return f"{ours:.1f}" if ref is None else f"{ours:.1f} ({ref:g})"

    columns = ["pruned"] + list(SINGLE)
    rows = [[f"{r:.1%}"] + [cell(c, r) for c in SINGLE] for r in RATIOS]
    title = (f"SmolLM2-135M WikiText-2 test ppl ({args.windows} x {args.seqlen}), base {base:.2f} "
             f"(prototype {PROTOTYPE_BASE}); prototype values in parentheses")
    print_table(title, columns, rows)

    both_columns = ["Q-K + V-O pruned", "allocation", "ppl", "x base", "KV cache", "params"]
    both_rows = [[f"{r:.1%}", a, f"{v['ppl']:.2f}", f"{v['ppl'] / base:.3f}", f"{v['kv_fraction']:.3f}",
                  f"{v['params_fraction']:.3f}"]
                 for a in BOTH for r, v in ((float(k), v) for k, v in results["both"][a].items())]
    print_table("Q-K (rotary-activation) + V-O (whitened) together", both_columns, both_rows)

    vo50 = results["single"]["V-O whitened (mixed + refit)"]["0.5"]["ppl"] / base
    both50 = min(results["both"][a]["0.5"]["ppl"] for a in BOTH) / base
    within = []
    for column, refs in PROTOTYPE.items():
        for ratio, ref in refs.items():
            ours = results["single"][column][str(ratio)]["ppl"] / base
            within.append(ours <= 1.05 * ref / PROTOTYPE_BASE)
    goals = [
        f"reproduces the prototype (each cell <= 1.05x the prototype's ratio to its base): "
        f"{sum(within)}/{len(within)} cells -> {'PASS' if all(within) else 'FAIL'}",
        f"V-O 50% <= 1.35x base ({args.calib_samples} calibration windows): {vo50:.3f}x -> "
        f"{'PASS' if vo50 <= 1.35 else 'FAIL'}",
        f"Q-K 50% + V-O 50% <= 1.6x base ({args.calib_samples} calibration windows): {both50:.3f}x -> "
        f"{'PASS' if both50 <= 1.6 else 'FAIL'}",
    ]
    for line in goals:
        print("goal:", line)

    command = (f"python benchmarks/prune_quality.py --windows {args.windows} --seqlen {args.seqlen} "
               f"--calib-samples {args.calib_samples}")
    write_json(args.json, {"machine": info, "command": command, "base_ppl": base, "windows": args.windows,
                           "seqlen": args.seqlen, "calibration_tokens": int(calibration.numel()),
                           "results": results, "prototype": {k: {str(r): v for r, v in d.items()}
                                                              for k, d in PROTOTYPE.items()}, "goals": goals})
    if not args.no_md:
        md = (f"Command: `{command}`\n\nMachine: {machine_line(info)}\n\n"
              f"SmolLM2-135M, WikiText-2 test perplexity on {args.windows} windows x {args.seqlen} tokens, base "
              f"{base:.2f} (the issue's prototype: {PROTOTYPE_BASE}, its numbers in parentheses). Uniform ratio per "
              f"layer and KV group; data-aware criteria calibrated on {args.calib_samples} x 512 WikiText-2 "
              "validation tokens.\n\n" + markdown_table(columns, rows) + "\n\nQ-K by rotary-activation pairs and V-O "
              "whitened (mixed + refit) together:\n\n" + markdown_table(both_columns, both_rows) + "\n\n"
              + "\n".join(f"- {g}" for g in goals) + "\n\nMore calibration text, sequential calibration and the other "
              "levers, one at a time: the prune_levers section.\n")
        update_benchmarks_md("prune_quality", md)


if __name__ == "__main__":
    main()
