"""CLOVER fine-tuning against LoRA / PiSSA / DoRA (peft) at an equal trainable-parameter count, on SmolLM2-135M.

    python benchmarks/finetune_compare.py [--steps 30] [--lrs 1e-3,3e-3] [--methods clover,lora,pissa,dora]
        [--json benchmarks/results/finetune_compare.json] [--no-md]

(a) Recovery: V-O 50% whitened (data-aware) pruning with WikiText-2 validation calibration, then every method
    tunes the pruned model on WikiText-2 validation windows; WikiText-2 test perplexity before and after.
(b) Adaptation: a generated task the model cannot do before training, "shift every digit by 3"
    (``shift 482910 -> 715243``); exact-match accuracy of greedy answers on held-out examples.

Every method gets the same steps, batch, data order and learning-rate grid, and the best learning rate per
method is reported. CLOVER trains its default targets (K's QR core, V-O cores, MLP up blocks); LoRA, PiSSA and
DoRA adapt the same modules at the rank whose count is closest to CLOVER's. Everything runs on CPU, offline.
"""

from __future__ import annotations

import argparse
import copy
import random
import shlex
import sys
import tempfile
import time

import torch

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
except ImportError:  # pragma: no cover - imported as benchmarks._report
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json

from clover.data import calibration_batches, load_rows, load_text
from clover.evaluate import perplexity
from clover.finetune import clover_parameter_count, lora_parameter_count, target_modules
from clover.finetune.data import token_windows
from clover.finetune.train import FinetuneConfig, train
from clover.models import load
from clover.prune import PruneConfig, prune

SECTION = "finetune_compare"
RECOVERY_GOAL = 1.10


def matched_lora_rank(model, targets) -> tuple[int, int, int]:
    """LoRA rank whose count on CLOVER's modules is closest to CLOVER's own count: (r, lora count, clover count)."""
    clover = clover_parameter_count(model, targets)
    modules = target_modules(model, targets)
    per_rank = lora_parameter_count(model, modules, 1)
    r = max(1, round(clover / per_rank))
    return r, r * per_rank, clover


def shift_examples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(6))
        out.append((f"shift {digits} ->", " " + "".join(str((int(c) + 3) % 10) for c in digits)))
    return out


def exact_match(model, tokenizer, examples) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for prompt, answer in examples:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            target = tokenizer(answer, return_tensors="pt").input_ids.shape[1]
            out = model.generate(ids, max_new_tokens=target, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            hits += tokenizer.decode(out[0, ids.shape[1]:]).strip() == answer.strip()
    return hits / len(examples)


def run_method(base, tokenizer, dataset, method, lr, r, args, evaluate):
    model = copy.deepcopy(base)
    config = FinetuneConfig(method=method, lora_r=r, steps=args.steps, lr=lr, batch_size=args.batch,
                            seqlen=dataset.windows.shape[1], save_steps=10 ** 6, logging_steps=10 ** 6,
                            lr_scheduler="constant", resume=False, seed=0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        final, result = train(model, tokenizer, dataset, config, run_dir, progress=False, log=lambda s: None)
    wall = time.perf_counter() - start
    return evaluate(final), result.trainable, wall, result.train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128, help="recovery training window")
    parser.add_argument("--lrs", default="1e-3,3e-3")
    parser.add_argument("--methods", default="clover,lora,pissa,dora")
    parser.add_argument("--eval-windows", type=int, default=16, help="test windows of 256 tokens for perplexity")
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--tasks", default="recovery,adaptation")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default="benchmarks/results/finetune_compare.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",")]

    info = machine_info()
    lm = load("smollm2-135m")
    tok = lm.tokenizer
    results = {"machine": info, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "tasks": {}}
    table_rows = []

    if "recovery" in tasks:
        test = load_text(split="test", data=args.data)
        rows = load_rows(split="validation", data=args.data)

        def ppl(model):
            return perplexity(model, tok, test, seqlen=256, max_windows=args.eval_windows, progress=False).ppl

        base_ppl = ppl(lm.model)
        calib = calibration_batches(tok, rows, 16, 256)
        pruned, _ = prune(lm.model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calib,
                                                progress=False))
        pruned_ppl = ppl(pruned)
        dataset = token_windows(tok, ["\n\n".join(rows)], args.seqlen)
        r, lora_count, clover_count = matched_lora_rank(pruned, None)
        task = {"base_ppl": base_ppl, "pruned_ppl": pruned_ppl, "lora_r": r, "lora_count": lora_count,
                "clover_count": clover_count, "runs": []}
        print(f"recovery: base ppl {base_ppl:.3f}, pruned {pruned_ppl:.3f}; LoRA r={r} ({lora_count:,}) "
              f"vs CLOVER {clover_count:,}", flush=True)
        for method in methods:
            for lr in lrs:
                value, trainable, wall, loss = run_method(pruned, tok, dataset, method, lr, r, args, ppl)
                task["runs"].append({"method": method, "lr": lr, "ppl": value, "trainable": trainable,
                                     "wall_s": wall, "train_loss": loss})
                print(f"  {method} lr={lr:g}: ppl {value:.3f} ({trainable:,} trainable, {wall:.0f} s)", flush=True)
        results["tasks"]["recovery"] = task

    if "adaptation" in tasks:
        train_examples = shift_examples(400, seed=1)
        heldout = shift_examples(args.heldout, seed=2)
        texts = [p + a for p, a in train_examples]
        dataset = token_windows(tok, texts, 64)

        def accuracy(model):
            return exact_match(model, tok, heldout)

        base_acc = accuracy(lm.model)
        r, lora_count, clover_count = matched_lora_rank(lm.model, None)
        task = {"base_accuracy": base_acc, "lora_r": r, "lora_count": lora_count, "clover_count": clover_count,
                "runs": []}
        print(f"adaptation: base exact match {base_acc:.3f}; LoRA r={r} ({lora_count:,}) vs CLOVER "
              f"{clover_count:,}", flush=True)
        for method in methods:
            for lr in lrs:
                value, trainable, wall, loss = run_method(lm.model, tok, dataset, method, lr, r, args, accuracy)
                task["runs"].append({"method": method, "lr": lr, "accuracy": value, "trainable": trainable,
                                     "wall_s": wall, "train_loss": loss})
                print(f"  {method} lr={lr:g}: exact match {value:.3f} ({wall:.0f} s)", flush=True)
        results["tasks"]["adaptation"] = task

    # Best learning rate per method and task.
    rec = results["tasks"].get("recovery")
    ada = results["tasks"].get("adaptation")
    for method in methods:
        row = [method]
        if rec:
            runs = [x for x in rec["runs"] if x["method"] == method]
            best = min(runs, key=lambda x: x["ppl"])
            row += [f"{best['trainable']:,}", f"{best['ppl']:.3f}", f"{best['ppl'] / rec['base_ppl']:.3f}x",
                    f"{best['lr']:g}", f"{best['wall_s']:.0f}"]
        if ada:
            runs = [x for x in ada["runs"] if x["method"] == method]
            best = max(runs, key=lambda x: x["accuracy"])
            row += [f"{best['trainable']:,}", f"{best['accuracy']:.3f}", f"{best['lr']:g}", f"{best['wall_s']:.0f}"]
        table_rows.append(row)
    columns = ["method"]
    if rec:
        columns += ["recovery trainable", "test ppl", "ppl / base", "best lr", "wall s"]
    if ada:
        columns += ["adaptation trainable", "exact match", "best lr", "wall s"]

    goals = []
    others = [m for m in methods if m != "clover"]
    if rec and "clover" in methods:
        best = {m: min(x["ppl"] for x in rec["runs"] if x["method"] == m) for m in methods}
        ratio = best["clover"] / rec["base_ppl"]
        goals.append(f"recovery to <= {RECOVERY_GOAL:.2f}x base ppl: {ratio:.3f}x -> "
                     + ("met" if ratio <= RECOVERY_GOAL else "NOT met"))
        if others:
            goals.append("CLOVER ppl <= best of " + "/".join(others) + f": {best['clover']:.3f} vs "
                         f"{min(best[m] for m in others):.3f} -> "
                         + ("met" if best["clover"] <= min(best[m] for m in others) else "NOT met"))
    if ada and "clover" in methods and others:
        best = {m: max(x["accuracy"] for x in ada["runs"] if x["method"] == m) for m in methods}
        rival = max(best[m] for m in others)
        verdict = ("not shown: no method learned the task in this budget" if max(best.values()) == 0
                   else "met" if best["clover"] >= rival else "NOT met")
        goals.append("CLOVER exact match >= best of " + "/".join(others) + f": {best['clover']:.3f} vs "
                     f"{rival:.3f} -> {verdict}")
    results["goals"] = goals
    print_table("CLOVER vs peft baselines (best lr per method)", columns, table_rows)
    for line in goals:
        print(line)
    write_json(args.json, results)
    if args.no_md:
        return
    lines = ["## Fine-tuning: CLOVER vs LoRA / PiSSA / DoRA (`benchmarks/finetune_compare.py`)", "",
             f"Command: `{results['command']}`", "", f"Machine: {machine_line(info)}", ""]
    if rec:
        lines += [f"Recovery: SmolLM2-135M, V-O 50% whitened prune (16 x 256 validation calibration tokens); "
                  f"WikiText-2 test ppl on {args.eval_windows} windows of 256: base {rec['base_ppl']:.3f}, pruned "
                  f"{rec['pruned_ppl']:.3f}. Training: {args.steps} steps x {args.batch} x {args.seqlen} tokens "
                  f"of WikiText-2 validation, constant lr from {{{args.lrs}}}; LoRA-family rank {rec['lora_r']} "
                  f"({rec['lora_count']:,} parameters) vs CLOVER {rec['clover_count']:,}.", ""]
    if ada:
        lines += [f"Adaptation: 'shift every digit of a 6-digit string by 3', {len(heldout)} held-out exact "
                  f"matches (greedy); base model {ada['base_accuracy']:.3f}. Training: {args.steps} steps x "
                  f"{args.batch} windows of 64 tokens of 400 generated examples; LoRA-family rank "
                  f"{ada['lora_r']} ({ada['lora_count']:,}) vs CLOVER {ada['clover_count']:,}.", ""]
    lines += [markdown_table(columns, table_rows), "", "Goals:", ""] + [f"- {g}" for g in goals]
    update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
