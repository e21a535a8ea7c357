"""llama.cpp's own settings on this CPU: decode speed of the original and the MLA export at one depth with 1 and 2
threads, flash attention off and on, each timed several times after one prompt (mean and spread), so that
engine_decode's thread count and flash-attention choice are measured rather than assumed.

    CLOVER_DATA=../shared/data python benchmarks/engine_settings.py [--depth 4096] [--repeats 5]
    python benchmarks/engine_settings.py --render benchmarks/results/engine_settings.json

It reuses engine_decode's GGUFs (built there if missing) and its decode loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, machine_info, machine_line, markdown_table, print_table, smollm2_calibrated, \
    update_benchmarks_md, write_json  # noqa: E402
from engine_decode import build, decode_speeds  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "engine_settings.json"
MODELS = ("original", "MLA KV 50%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--render", type=Path, default=None, help="Only print and write the tables of a saved run.")
    args = parser.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()))
        return

    from clover.data import load_text
    from clover.evaluate import _token_ids

    info = machine_info()
    lm, calib = smollm2_calibrated()
    ids = _token_ids(lm.tokenizer, load_text(split="test"))
    built = build(lm, calib, set(MODELS))
    rows = []
    for name in MODELS:
        for threads in (1, 2):
            for flash_attn in (False, True):
                got = decode_speeds(built[name]["path"], ids[:args.depth], args.new_tokens, 1, None, threads,
                                    flash_attn, repeats=args.repeats)
                rows.append({"model": name, "threads": threads, "flash_attn": flash_attn,
                             "tokens_per_s_runs": got["tokens_per_s_runs"], "prefill_s": got["prefill_s"],
                             "loadavg": os.getloadavg()[0]})
                print(rows[-1], flush=True)
                payload = {"machine": info, "depth": args.depth, "repeats": args.repeats,
                           "new_tokens": args.new_tokens, "rows": rows, "loadavg_end": os.getloadavg()[0],
                           "command": "python benchmarks/engine_settings.py " + " ".join(sys.argv[1:])}
                write_json(RESULTS, payload)
    render(payload)


def render(payload: dict) -> None:
    columns = ["model", "threads", "flash attn", "decode tok/s (mean)", "sd", "min", "max", "prompt s",
               "load avg after"]
    table = []
    for r in payload["rows"]:
        runs = r["tokens_per_s_runs"]
        table.append([r["model"], r["threads"], "on" if r["flash_attn"] else "off", f"{statistics.mean(runs):.2f}",
                      f"{statistics.stdev(runs):.2f}" if len(runs) > 1 else "-", f"{min(runs):.2f}",
                      f"{max(runs):.2f}", f"{r['prefill_s']:.1f}", f"{r['loadavg']:.2f}"])
    title = (f"SmolLM2-135M (f16 GGUF, f16 cache) in llama.cpp at depth {payload['depth']}: "
             f"{payload['repeats']} timings of {payload['new_tokens']} tokens each after one prompt")
    print_table(title, columns, table)
    verdicts = verdicts_of(payload)
    for line in verdicts:
        print(line)
    md = (f"Command: `{payload['command']}`\n\nMachine: {machine_line(payload['machine'])}; load average at the end "
          f"{payload['loadavg_end']:.2f}\n\n{title}.\n\n" + markdown_table(columns, table) + "\n\n"
          + "\n".join(f"- {line}" for line in verdicts))
    update_benchmarks_md("engine_settings", md)


def verdicts_of(payload: dict) -> list[str]:
    """Per model: the fastest setting, whether flash attention helps, whether 1 thread is steadier than 2."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["model"] == name]
        best = max(rows, key=lambda r: statistics.mean(r["tokens_per_s_runs"]))
        lines.append(f"{name}: fastest with {best['threads']} thread(s), flash attention "
                     f"{'on' if best['flash_attn'] else 'off'} ({statistics.mean(best['tokens_per_s_runs']):.2f} "
                     "tok/s)")
        for threads in (1, 2):
            pair = {r["flash_attn"]: statistics.mean(r["tokens_per_s_runs"]) for r in rows if r["threads"] == threads}
            if len(pair) == 2:
                lines.append(f"{name}, {threads} thread(s): flash attention on / off = {pair[True] / pair[False]:.2f}x")
        spread = {r["threads"]: statistics.stdev(r["tokens_per_s_runs"]) / statistics.mean(r["tokens_per_s_runs"])
                  for r in rows if not r["flash_attn"] and len(r["tokens_per_s_runs"]) > 1}
        if len(spread) == 2:
            lines.append(f"{name}, flash attention off: relative sd 1 thread {spread[1]:.1%}, 2 threads "
                         f"{spread[2]:.1%} ({'1' if spread[1] < spread[2] else '2'} thread(s) steadier)")
    best = {name: max(statistics.mean(r["tokens_per_s_runs"]) for r in payload["rows"] if r["model"] == name)
            for name in dict.fromkeys(r["model"] for r in payload["rows"])}
    if len(best) == 2:
        (a, fast_a), (b, fast_b) = best.items()
        lines.append(f"{b} at its best setting over {a} at its best: {fast_b / fast_a:.2f}x")
    return lines


if __name__ == "__main__":
    main()
