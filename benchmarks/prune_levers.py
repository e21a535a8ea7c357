"""What moves SmolLM2's perplexity at a 50% prune: each calibration lever measured on its own.

    python benchmarks/prune_levers.py [--windows 40] [--seqlen 512] [--json benchmarks/results/prune_levers.json]

The issue's goals (V-O 50% <= 1.35x base; Q-K 50% + V-O 50% <= 1.6x base) are aimed at with data: the
prototype whitened V-O with the layer input (16 x 512 calibration tokens). Here every variant is one row:
which covariance whitens V-O, whether O is refit per head, how much calibration text, uniform or global ranks,
one-shot or sequential calibration (each layer measured with the earlier layers already pruned), and the
rotary-pair Q-K criteria together with the best V-O. Calibration is WikiText-2 validation; evaluation
is the test split. Prints a table, writes JSON, updates the ``prune_levers`` section of BENCHMARKS.md.
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


def variants(calib16, calib64, calib256):
    vo = dict(vo_ratio=0.5, criterion="whitened")
    both = dict(vo_ratio=0.5, qk_ratio=0.5, criterion="whitened")
    return [
        ("V-O 50%", "input whitening (prototype)", PruneConfig(**vo, vo_whitening="input", calibration=calib16)),
        ("V-O 50%", "attention-mixed values, no refit", PruneConfig(**vo, vo_refit=False, calibration=calib16)),
        ("V-O 50%", "attention-mixed values + per-head O refit", PruneConfig(**vo, calibration=calib16)),
        ("V-O 50%", "mixed + refit, 64 calibration windows", PruneConfig(**vo, calibration=calib64)),
        ("V-O 50%", "mixed + refit, 256 calibration windows", PruneConfig(**vo, calibration=calib256)),
        ("V-O 50%", "mixed + refit, global allocation", PruneConfig(**vo, allocation="global", calibration=calib16)),
        ("V-O 50%", "mixed + refit, global allocation, 256 windows",
         PruneConfig(**vo, allocation="global", calibration=calib256)),
        ("V-O 50%", "mixed + refit, sequential calibration", PruneConfig(**vo, sequential=True, calibration=calib16)),
        ("Q-K 50% + V-O 50%", "rotary-weight Q-K, mixed + refit V-O",
         PruneConfig(**both, qk_criterion="rotary-weight", calibration=calib16)),
        ("Q-K 50% + V-O 50%", "rotary-activation Q-K, mixed + refit V-O",
         PruneConfig(**both, qk_criterion="rotary-activation", calibration=calib16)),
        ("Q-K 50% + V-O 50%", "rotary-activation Q-K, mixed + refit V-O, 64 windows",
         PruneConfig(**both, qk_criterion="rotary-activation", calibration=calib64)),
        ("Q-K 50% + V-O 50%", "rotary-activation Q-K, mixed + refit V-O, 256 windows",
         PruneConfig(**both, qk_criterion="rotary-activation", calibration=calib256)),
        ("Q-K 50% + V-O 50%", "rotary-activation Q-K, mixed + refit V-O, sequential calibration",
         PruneConfig(**both, qk_criterion="rotary-activation", sequential=True, calibration=calib16)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data", default=None, help="folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA)")
    parser.add_argument("--json", default="benchmarks/results/prune_levers.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    info = machine_info()
    lm = load("smollm2-135m")
    text = load_text(split="test", data=args.data)
    rows = load_rows(split="validation", data=args.data)
    calib16 = calibration_batches(lm.tokenizer, rows, 16, 512)
    calib64 = calibration_batches(lm.tokenizer, rows, 64, 512)
    calib256 = calibration_batches(lm.tokenizer, rows, 256, 512)

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, text, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl

    base = ppl(lm.model)
    results = []
    for pruned_what, lever, config in tqdm(variants(calib16, calib64, calib256), desc="levers", unit="prune"):
        config.progress = False
        start = time.perf_counter()
        pruned, report = prune(lm.model, config)
        seconds = time.perf_counter() - start
        value = ppl(pruned)
        results.append({"pruned": pruned_what, "lever": lever, "ppl": value, "ratio_to_base": value / base,
                        "kv_fraction": report.kv_bytes_per_token_after / report.kv_bytes_per_token_before,
                        "calibration_tokens": report.calibration_tokens, "prune_seconds": seconds})
        del pruned

    columns = ["pruned", "lever", "ppl", "x base", "KV cache", "calib tokens", "prune s"]
    table = [[r["pruned"], r["lever"], f"{r['ppl']:.2f}", f"{r['ratio_to_base']:.3f}", f"{r['kv_fraction']:.2f}",
              r["calibration_tokens"], f"{r['prune_seconds']:.0f}"] for r in results]
    print_table(f"SmolLM2-135M, WikiText-2 test ppl ({args.windows} x {args.seqlen}), base {base:.2f}", columns, table)
    best_vo = min(r["ratio_to_base"] for r in results if r["pruned"] == "V-O 50%")
    best_both = min(r["ratio_to_base"] for r in results if r["pruned"].startswith("Q-K"))
    goals = [f"V-O 50% <= 1.35x base: best {best_vo:.3f}x -> {'PASS' if best_vo <= 1.35 else 'FAIL'}",
             f"Q-K 50% + V-O 50% <= 1.6x base: best {best_both:.3f}x -> {'PASS' if best_both <= 1.6 else 'FAIL'}"]
    for line in goals:
        print("goal:", line)
    payload = {"machine": info, "base_ppl": base, "windows": args.windows, "seqlen": args.seqlen,
               "results": results, "goals": goals}
    write_json(args.json, payload)
    if not args.no_md:
        md = (f"Command: `python benchmarks/prune_levers.py --windows {args.windows} --seqlen {args.seqlen}`\n\n"
              f"Machine: {machine_line(info)}\n\n"
              f"SmolLM2-135M, WikiText-2 test perplexity on {args.windows} windows x {args.seqlen} tokens "
              f"(base {base:.2f}); calibration on WikiText-2 validation windows of 512 tokens.\n\n"
              + markdown_table(columns, table) + "\n\n" + "\n".join(f"- {g}" for g in goals) + "\n")
        update_benchmarks_md("prune_levers", md)


if __name__ == "__main__":
    main()
