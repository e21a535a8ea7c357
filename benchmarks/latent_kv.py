"""Latent KV on SmolLM2-135M: perplexity with half, a quarter and an eighth of the KV cache kept, and decode speed.

    python benchmarks/latent_kv.py [--windows 40] [--seqlen 512] [--contexts 512 2048 8192] [--new-tokens 16]

One run, five parts:

1. Perplexity at KV cache 50%, 25% and 12.5% of the original (WikiText-2 test, ``--windows`` x ``--seqlen``) for
   today's per-head best (``prune``: whitened V-O with attention-mixed values and O refit, Q-K by rotary-activation
   pairs, both at the same ratio) and each RoPE option of ``to_latent`` (``latent``: pre-RoPE key latent rebuilt
   when attending; ``shared``: rotary components shared across KV heads, exact, nothing rebuilt; ``mix``).
2. The levers at KV 50% (``--rope latent``): what whitens the values, the O refit, allocation (the default,
   attention-mixed values + O refit + global allocation, is the ``latent --rope latent`` row of part 1).
   A GPT-2-shaped random model (12 x 768) is converted too, for the decode rows: no RoPE, so everything absorbs.
3. CLOVER on top (the poster's combination): the KV-halved latent model's V-O pruned by 50% with the whitened
   criterion, next to a direct conversion at the same cache size.
4. Recovery: a short CLOVER tuning (targets vo + up; ``--tune-steps`` steps of 4 x 256 tokens of WikiText-2
   validation, lr 1e-3 constant) of the latent models at KV 50% and 25%, next to the unconverted base tuned
   identically on the same data: the only fair control.
5. Decode tokens/s (greedy, batch 1, float32, prefill excluded) and the KV bytes per token read off the cache after
   prefill, at each context, original against the KV-halved conversions: the cost of rebuilding keys is shown.

Calibration: 16 WikiText-2 validation windows of 512 tokens (the last 4 choose the key/value split). Prints tables,
writes JSON, updates the ``latent_kv`` section of BENCHMARKS.md. Goals are checked and printed, met or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
    from decode_speed import decode
except ImportError:  # pragma: no cover - imported as benchmarks.latent_kv
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
    from .decode_speed import decode

from clover.data import calibration_batches, load_rows, load_text
from clover.evaluate import perplexity
from clover.finetune.data import token_windows
from clover.finetune.train import FinetuneConfig, train
from clover.latent import LatentConfig, to_latent
from clover.models import load
from clover.prune import PruneConfig, prune

KEPT = (0.5, 0.25, 0.125)  # fraction of the KV cache kept
ROPES = ("latent", "shared", "mix")


def levers(calib) -> list[tuple[str, LatentConfig]]:
    half = dict(kv_ratio=0.5, calibration=calib, progress=False)
    return [
        ("values whitened by the attention input (the sketch), no O refit",
         LatentConfig(**half, v_moment="input", o_refit=False)),
        ("values whitened by attention-mixed inputs, no O refit", LatentConfig(**half, o_refit=False)),
        ("mixed + O refit, uniform allocation", LatentConfig(**half, allocation="uniform")),
    ]


def tuned(model, tokenizer, dataset, steps: int):
    """A copy of ``model`` after the recovery recipe (CLOVER, targets vo + up), merged back into plain weights."""
    config = FinetuneConfig(method="clover", targets="vo,up", steps=steps, lr=1e-3, batch_size=4,
                            seqlen=dataset.windows.shape[1], save_steps=10 ** 6, logging_steps=10 ** 6,
                            lr_scheduler="constant", resume=False, seed=0)
    with tempfile.TemporaryDirectory() as run_dir:
        final, _ = train(copy.deepcopy(model), tokenizer, dataset, config, run_dir, progress=False, log=lambda s: None)
    return final


def gpt2_pair(positions: int) -> list[tuple[str, torch.nn.Module]]:
    """A GPT-2-shaped random model (12 layers, hidden 768, 12 heads) and its KV-halved latent conversion,
    calibrated on seeded random tokens (random weights have no text to learn from: this row is about speed and
    cache size only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=positions)).eval()
    calib = torch.randint(0, model.config.vocab_size, (16, 512), generator=torch.Generator().manual_seed(0))
    latent, _ = to_latent(model, LatentConfig(kv_ratio=0.5, calibration=calib, progress=False))
    return [("original", model), ("latent, KV 50% (keys and values absorbed)", latent)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tune-steps", type=int, default=30)
    parser.add_argument("--data", default=None, help="folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA)")
    parser.add_argument("--json", default="benchmarks/results/latent_kv.json")
    parser.add_argument("--no-md", action="store_true")
    parser.add_argument("--render", metavar="JSON", help="only print and write BENCHMARKS.md from a saved run")
    args = parser.parse_args()
    if args.render:
        with open(args.render, encoding="utf-8") as fh:
            render(json.load(fh), write_md=not args.no_md)
        return

    info = machine_info()
    lm = load("smollm2-135m")
    text = load_text(split="test", data=args.data)
    calib = calibration_batches(lm.tokenizer, load_rows(split="validation", data=args.data), 16, 512)

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, text, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl

    base = ppl(lm.model)
    quality, halved, by_kept = [], {}, {}
    jobs = [(kept, "per-head best (prune)", None) for kept in KEPT] + \
           [(kept, f"latent --rope {rope}", rope) for kept in KEPT for rope in ROPES]
    for kept, method, rope in tqdm(jobs, desc="quality", unit="model"):
        start = time.perf_counter()
        if rope is None:
            model, report = prune(lm.model, PruneConfig(qk_ratio=1 - kept, vo_ratio=1 - kept, criterion="whitened",
                                                        qk_criterion="rotary-activation", calibration=calib,
                                                        progress=False))
            split = None
        else:
            model, report = to_latent(lm.model, LatentConfig(kv_ratio=1 - kept, rope=rope, calibration=calib,
                                                             progress=False))
            split = report.split
            original_kv = report.kv_bytes_per_token_before
            if kept == 0.5:
                halved[rope] = model
            if rope == "latent":
                by_kept[kept] = model
        seconds = time.perf_counter() - start
        value = ppl(model)
        quality.append({"kv_kept": kept, "method": method, "ppl": value, "ratio_to_base": value / base,
                        "kv_fraction": report.kv_bytes_per_token_after / report.kv_bytes_per_token_before,
                        "params": report.params_after, "split": split, "convert_seconds": seconds})
        del model

    on_top = []
    start_model = by_kept[0.5]
    pruned, report = prune(start_model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calib,
                                                    progress=False))
    fraction = report.kv_bytes_per_token_after / original_kv
    direct, _ = to_latent(lm.model, LatentConfig(kv_ratio=1 - fraction, calibration=calib, progress=False))
    for name, model in (("latent KV 50% (--rope latent), then CLOVER V-O 50% (whitened)", pruned),
                        ("latent conversion straight to the same cache", direct)):
        value = ppl(model)
        on_top.append({"method": name, "ppl": value, "ratio_to_base": value / base, "kv_fraction": fraction})
    del pruned, direct

    windows = token_windows(lm.tokenizer, ["\n\n".join(load_rows(split="validation", data=args.data))], 256)
    base_tuned = ppl(tuned(lm.model, lm.tokenizer, windows, args.tune_steps))
    recovery = [{"model": "base (unconverted), tuned identically", "kv_kept": 1.0, "ppl": base_tuned,
                 "ratio_to_tuned_base": 1.0}]
    for kept in (0.5, 0.25):
        value = ppl(tuned(by_kept[kept], lm.tokenizer, windows, args.tune_steps))
        recovery.append({"model": f"latent --rope latent, KV {kept:.0%}, tuned", "kv_kept": kept, "ppl": value,
                         "ratio_to_tuned_base": value / base_tuned})

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_json(args.json, {"machine": info, "command": command, "partial": "quality only", "base_ppl": base,
                           "windows": args.windows, "seqlen": args.seqlen, "quality": quality})
    lever_rows = []
    for lever, config in tqdm(levers(calib), desc="levers", unit="model"):
        model, report = to_latent(lm.model, config)
        value = ppl(model)
        lever_rows.append({"lever": lever, "ppl": value, "ratio_to_base": value / base, "split": report.split,
                           "kv_fraction": report.kv_bytes_per_token_after / report.kv_bytes_per_token_before})
        del model

    speed = []
    groups = [("SmolLM2-135M", [("original", lm.model)] + [(f"latent --rope {rope}, KV 50%", m)
                                                          for rope, m in halved.items()])]
    groups.append(("GPT-2-shaped random (124M)", gpt2_pair(max(args.contexts) + args.new_tokens)))
    for context in tqdm(args.contexts, desc="decode", unit="context"):
        for family, contenders in groups:
            vocab = contenders[0][1].config.vocab_size
            runs: dict[str, list[dict]] = {name: [] for name, _ in contenders}
            for _ in range(args.repeats):  # alternate, so drifting load hits every model alike
                for name, model in contenders:
                    runs[name].append(decode(model, context, args.new_tokens, vocab))
            base_speed = statistics.median(r["tokens_per_s"] for r in runs["original"])
            for name, _ in contenders:
                tps = statistics.median(r["tokens_per_s"] for r in runs[name])
                speed.append({"context": context, "family": family, "model": name, "tokens_per_s": tps,
                              "speed_vs_original": tps / base_speed,
                              "kv_bytes_per_token": runs[name][0]["kv_bytes_per_token"]})

    payload = {"machine": info, "command": command, "base_ppl": base, "windows": args.windows, "seqlen": args.seqlen,
               "calibration": "16 x 512 WikiText-2 validation", "quality": quality, "levers": lever_rows,
               "clover_on_top": on_top, "recovery": {"steps": args.tune_steps, "rows": recovery},
               "decode": {"new_tokens": args.new_tokens, "repeats": args.repeats, "contexts": args.contexts,
                          "rows": speed}}
    payload["goals"] = goals_of(payload)
    write_json(args.json, payload)
    render(payload, write_md=not args.no_md)


def goals_of(payload: dict) -> list[str]:
    """The issue's goals, each MET / NOT MET from the measured rows, or NOT RUN where its part is missing."""
    quality = payload["quality"]

    def best(kept: float) -> tuple[float, str]:
        rows = [r for r in quality if r["kv_kept"] == kept and r["method"].startswith("latent")]
        top = min(rows, key=lambda r: r["ratio_to_base"])
        return top["ratio_to_base"], top["method"]

    half, quarter = best(0.5), best(0.25)
    goals = [f"KV halved at <= 1.15x base, training-free: best {half[0]:.3f}x ({half[1]}) -> "
             f"{'MET' if half[0] <= 1.15 else 'NOT MET'}",
             f"KV at 25% at <= 1.5x base: best {quarter[0]:.3f}x ({quarter[1]}) -> "
             f"{'MET' if quarter[0] <= 1.5 else 'NOT MET'}"]
    speed = payload.get("decode", {}).get("rows", [])
    fastest = max((r for r in speed if r["context"] == 2048 and r["model"] != "original"
                   and r["family"] == "SmolLM2-135M"), key=lambda r: r["speed_vs_original"], default=None)
    goals.append("decode at 2048 context no slower than the original with the cache halved: " + (
        "NOT RUN" if fastest is None else f"best {fastest['speed_vs_original']:.2f}x ({fastest['model']}) -> "
                                          f"{'MET' if fastest['speed_vs_original'] >= 1.0 else 'NOT MET'}"))
    recovery = payload.get("recovery", {}).get("rows", [])
    quarter_tuned = next((r["ratio_to_tuned_base"] for r in recovery if r["kv_kept"] == 0.25), None)
    goals.append("after recovery tuning, KV 25% within 1.05x of the identically tuned base: " + (
        "NOT RUN" if quarter_tuned is None else f"{quarter_tuned:.3f}x -> "
                                                f"{'MET' if quarter_tuned <= 1.05 else 'NOT MET'}"))
    return goals


def render(payload: dict, write_md: bool = True) -> None:
    """Tables of whatever parts ``payload`` holds (a partial run names the parts it lacks), and the md section."""
    windows, seqlen = payload.get("windows", 40), payload.get("seqlen", 512)
    title = f"SmolLM2-135M, WikiText-2 test ppl ({windows} x {seqlen}), base {payload['base_ppl']:.2f}"
    q_columns = ["KV kept", "method", "ppl", "x base", "params", "split", "convert s"]
    q_table = [[f"{r['kv_kept']:.1%}", r["method"], f"{r['ppl']:.2f}", f"{r['ratio_to_base']:.3f}",
                f"{r['params']:,}", "-" if r["split"] is None else f"{r['split']:g}", f"{r['convert_seconds']:.0f}"]
               for r in payload["quality"]]
    print_table(title, q_columns, q_table)
    sections = [f"{title}; calibration on 16 WikiText-2 validation windows of 512 tokens (the last 4 choose the "
                "key/value split). `per-head best` is `prune` with whitened V-O (attention-mixed values, O refit) and "
                "rotary-activation Q-K pairs at the same ratio on both pairs.\n\n" + markdown_table(q_columns, q_table)]
    missing = []
    if payload.get("levers"):
        columns = ["lever (KV 50%, --rope latent)", "ppl", "x base", "split"]
        table = [[r["lever"], f"{r['ppl']:.2f}", f"{r['ratio_to_base']:.3f}",
                  "-" if r["split"] is None else f"{r['split']:g}"] for r in payload["levers"]]
        print_table("levers", columns, table)
        sections.append("Levers at KV 50%:\n\n" + markdown_table(columns, table))
    else:
        missing.append("levers")
    if payload.get("clover_on_top"):
        columns = ["CLOVER on top", "KV kept", "ppl", "x base"]
        table = [[r["method"], f"{r['kv_fraction']:.1%}", f"{r['ppl']:.2f}", f"{r['ratio_to_base']:.3f}"]
                 for r in payload["clover_on_top"]]
        print_table("CLOVER on top", columns, table)
        sections.append("CLOVER on top of the conversion (V-O of the latent model, one multi-query group per "
                        "layer):\n\n" + markdown_table(columns, table))
    else:
        missing.append("CLOVER on top")
    recovery = payload.get("recovery", {})
    if recovery.get("rows"):
        columns = ["recovery", "ppl", "x tuned base"]
        table = [[r["model"], f"{r['ppl']:.2f}", f"{r['ratio_to_tuned_base']:.3f}"] for r in recovery["rows"]]
        print_table(f"recovery ({recovery['steps']} steps)", columns, table)
        sections.append(f"Recovery: CLOVER tuning (vo + up, {recovery['steps']} steps of 4 x 256 WikiText-2 "
                        "validation tokens, lr 1e-3 constant, seed 0) of the converted models and of the unconverted "
                        "base, identically:\n\n" + markdown_table(columns, table))
    else:
        missing.append("recovery")
    decode = payload.get("decode", {})
    if decode.get("rows"):
        columns = ["context", "family", "model", "tokens/s", "vs original", "KV bytes / token (measured)"]
        table = [[r["context"], r["family"], r["model"], f"{r['tokens_per_s']:.1f}", f"{r['speed_vs_original']:.2f}",
                  f"{r['kv_bytes_per_token']:,.0f}"] for r in decode["rows"]]
        print_table(f"decode, {decode['new_tokens']} new tokens, median of {decode['repeats']}", columns, table)
        sections.append(f"Decode ({decode['new_tokens']} greedy tokens after a random prompt of the context length, "
                        f"batch 1, float32, median of {decode['repeats']} alternating runs; KV bytes read off the "
                        "cache after prefill):\n\n" + markdown_table(columns, table))
    else:
        missing.append("decode")
    goals = payload.get("goals") or goals_of(payload)
    for line in goals:
        print("goal:", line)
    if not write_md:
        return
    command = payload.get("command", "python benchmarks/latent_kv.py")
    md = f"Command: `{command}`\n\nMachine: {machine_line(payload['machine'])}\n\n" + "\n\n".join(sections)
    if missing:
        md += (f"\n\nNot in this run (it stopped after the quality part): {', '.join(missing)}; "
               "rerun the command for them.")
    md += "\n\n" + "\n".join(f"- {g}" for g in goals) + "\n"
    update_benchmarks_md("latent_kv", md)


if __name__ == "__main__":
    main()
