"""CLOVER fine-tuning against LoRA / PiSSA / DoRA (peft) at an equal trainable-parameter count, on SmolLM2-135M,
over several seeds, with the controls a claim needs.

    python benchmarks/finetune_compare.py [--seeds 0,1,2] [--steps 30] [--batch 4]
        [--lrs clover=3e-3,lora=1e-3,pissa=1e-3,dora=3e-3] [--methods clover,lora,pissa,dora]
        [--tasks recovery,adaptation,arithmetic] [--json benchmarks/results/finetune_compare.json] [--no-md]

Three tasks:

(a) Recovery: V-O 50% whitened pruning (WikiText-2 validation calibration), then each method tunes the pruned
    model on WikiText-2 validation windows; WikiText-2 test perplexity after. The control is the unpruned base
    tuned identically (same method, seed, data, steps): tuning on WikiText makes any model beat the untuned instruct
    base, so only "pruned + tuned" against "base + tuned" says what pruning cost.
(b) Adaptation: a format the model cannot produce before training, "shift every digit by 3"
    (``shift 482910 -> 715243``); exact match of greedy answers on held-out examples.
(c) Arithmetic: two-step sums ``What is 37 + 48 - 19?``, scored as a four-way multiple-choice task through
    lm-evaluation-harness (``clover.tasks``, a local task of the harness's own format); the distractors are one
    and ten away from the answer, so the right choice needs the arithmetic done, not the format learned.

Every method gets the same steps, batch, data and seeds. A seed sets the data order and the adapter's random
initialization (LoRA's and DoRA's A; PiSSA and CLOVER start from SVDs, so only their data order moves). Learning
rates are one per method, the best of the earlier 1e-3 / 3e-3 grid (see BENCHMARKS.md history): CLOVER 3e-3,
LoRA 1e-3, PiSSA 1e-3 (3e-3 diverges), DoRA 3e-3. CLOVER trains its default targets (K's QR core, V-O cores, MLP
up blocks); the LoRA family adapts the same modules at the rank whose count is closest to CLOVER's.

Verdicts compare CLOVER's mean with each baseline's: "ahead" or "behind" when the difference is larger than twice
its standard error (sqrt(sd_a^2 / n + sd_b^2 / n) over n seeds), else "within noise". Everything runs on CPU,
offline.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shlex
import statistics
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
from clover.tasks import TaskConfig, evaluate_tasks, write_choice_task

SECTION = "finetune_compare"
LRS = "clover=3e-3,lora=1e-3,pissa=1e-3,dora=3e-3"
ARITHMETIC = "clover_arithmetic"


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


def arithmetic_examples(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``a + b - c`` with two-digit operands and a non-negative answer; four choices: the answer, +-1 and +-10."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = rng.randint(10, min(99, a + b))
        question = f"What is {a} + {b} - {c}?"
        if question in exclude or any(d["question"] == question for d in out):
            continue
        answer = a + b - c
        offsets = [0, rng.choice([-1, 1]), rng.choice([-10, 10]), rng.choice([-11, -9, 9, 11])]
        choices = [str(answer + o) if answer + o >= 0 else str(answer - o) for o in offsets]
        if len(set(choices)) < 4:
            continue
        order = list(range(4))
        rng.shuffle(order)
        out.append({"question": question, "choices": [choices[i] for i in order], "label": order.index(0),
                    "answer": str(answer)})
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


def tuned(base, tokenizer, dataset, method: str, lr: float, r: int, seed: int, args):
    """A copy of ``base`` tuned by ``method`` and merged back: (model, trainable count, wall seconds)."""
    config = FinetuneConfig(method=method, lora_r=r, steps=args.steps, lr=lr, batch_size=args.batch,
                            seqlen=dataset.windows.shape[1], save_steps=10 ** 6, logging_steps=10 ** 6,
                            lr_scheduler="constant", resume=False, seed=seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        final, result = train(copy.deepcopy(base), tokenizer, dataset, config, run_dir, progress=False,
                              log=lambda s: None)
    return final, result.trainable, time.perf_counter() - start


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(clover: list[float], rival: list[float], higher_is_better: bool) -> str:
    (ma, sa), (mb, sb) = spread(clover), spread(rival)
    noise = 2 * math.sqrt(sa ** 2 / len(clover) + sb ** 2 / len(rival))
    better = (ma - mb) if higher_is_better else (mb - ma)
    if len(clover) < 2 or len(rival) < 2:
        return "one seed: no spread to judge by"
    if abs(better) <= noise:
        return f"within noise (difference {abs(ma - mb):.3g} <= 2 SE {noise:.3g})"
    return ("ahead" if better > 0 else "behind") + f" (difference {abs(ma - mb):.3g} > 2 SE {noise:.3g})"


def cell(values: list[float], digits: int) -> str:
    mean, sd = spread(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128, help="recovery training window")
    parser.add_argument("--lrs", default=LRS, help="one learning rate per method, METHOD=LR,...")
    parser.add_argument("--methods", default="clover,lora,pissa,dora")
    parser.add_argument("--eval-windows", type=int, default=8, help="test windows of 256 tokens for perplexity")
    parser.add_argument("--heldout", type=int, default=40, help="held-out examples for adaptation and arithmetic")
    parser.add_argument("--tasks", default="recovery,adaptation,arithmetic")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default="benchmarks/results/finetune_compare.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    lrs = {k.strip(): float(v) for k, v in (item.split("=") for item in args.lrs.split(","))}
    missing = [m for m in methods if m not in lrs]
    if missing:
        parser.error(f"--lrs has no learning rate for {', '.join(missing)}")
    tasks = [t.strip() for t in args.tasks.split(",")]

    info = machine_info()
    lm = load("smollm2-135m")
    tok = lm.tokenizer
    results = {"machine": info, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
               "seeds": seeds, "steps": args.steps, "batch": args.batch, "lrs": {m: lrs[m] for m in methods},
               "tasks": {}}

    def sweep(name: str, base, dataset, score, controls=None) -> dict:
        """Every method x seed on ``base``; ``controls``: also tune this model identically, per method and seed."""
        r, lora_count, clover_count = matched_lora_rank(base, None)
        task = {"lora_r": r, "lora_count": lora_count, "clover_count": clover_count, "runs": []}
        for method in methods:
            for seed in seeds:
                model, trainable, wall = tuned(base, tok, dataset, method, lrs[method], r, seed, args)
                run = {"method": method, "seed": seed, "score": score(model), "trainable": trainable, "wall_s": wall}
                del model
                if controls is not None:
                    control, _, _ = tuned(controls, tok, dataset, method, lrs[method], r, seed, args)
                    run["control"] = score(control)
                    del control
                task["runs"].append(run)
                print(f"  {name} {method} seed {seed}: {run['score']:.4f}"
                      + (f" (base tuned identically {run['control']:.4f})" if "control" in run else "")
                      + f", {trainable:,} trainable, {wall:.0f} s", flush=True)
        return task

    if "recovery" in tasks:
        test = load_text(split="test", data=args.data)
        rows = load_rows(split="validation", data=args.data)

        def ppl(model):
            return perplexity(model, tok, test, seqlen=256, max_windows=args.eval_windows, progress=False).ppl

        calib = calibration_batches(tok, rows, 16, 256)
        pruned, _ = prune(lm.model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calib,
                                                progress=False))
        base_ppl, pruned_ppl = ppl(lm.model), ppl(pruned)
        print(f"recovery: base ppl {base_ppl:.3f}, pruned {pruned_ppl:.3f}", flush=True)
        dataset = token_windows(tok, ["\n\n".join(rows)], args.seqlen)
        task = sweep("recovery", pruned, dataset, ppl, controls=lm.model)
        results["tasks"]["recovery"] = {"base_ppl": base_ppl, "pruned_ppl": pruned_ppl, **task}
        del pruned

    if "adaptation" in tasks:
        heldout = shift_examples(args.heldout, seed=2)
        dataset = token_windows(tok, [p + a for p, a in shift_examples(400, seed=1)], 64)

        def shift_accuracy(model):
            return exact_match(model, tok, heldout)

        base = shift_accuracy(lm.model)
        print(f"adaptation: base exact match {base:.3f}", flush=True)
        results["tasks"]["adaptation"] = {"base_score": base, **sweep("adaptation", lm.model, dataset,
                                                                      shift_accuracy)}

    if "arithmetic" in tasks:
        heldout = arithmetic_examples(args.heldout, seed=2)
        train_docs = arithmetic_examples(600, seed=1, exclude={d["question"] for d in heldout})
        texts = [f"Question: {d['question']}\nAnswer: {d['answer']}" for d in train_docs]
        dataset = token_windows(tok, texts, 64)
        with tempfile.TemporaryDirectory() as folder:
            config = TaskConfig(tasks=[ARITHMETIC], task_dir=write_choice_task(folder, ARITHMETIC, heldout),
                                batch_size=8, progress=False)

            def choice_accuracy(model):
                return evaluate_tasks(model, tok, config).score(ARITHMETIC).acc

            base = choice_accuracy(lm.model)
            print(f"arithmetic: base accuracy {base:.3f} (chance 0.25)", flush=True)
            results["tasks"]["arithmetic"] = {"base_score": base, **sweep("arithmetic", lm.model, dataset,
                                                                          choice_accuracy)}

    render(results, args)
    write_json(args.json, results)


def render(results: dict, args) -> None:
    rec, ada, ari = (results["tasks"].get(k) for k in ("recovery", "adaptation", "arithmetic"))
    methods = list(results["lrs"])

    def runs(task, method, key="score"):
        return [r[key] for r in task["runs"] if r["method"] == method]

    columns, rows = ["method", "lr", "trainable (recovery)"], []
    if rec:
        columns += ["recovery ppl", "base tuned identically", "ratio to tuned base"]
    if ada:
        columns += ["shift exact match"]
    if ari:
        columns += ["arithmetic acc"]
    columns += ["wall s / run"]
    for method in methods:
        first = next(t for t in (rec, ada, ari) if t)
        row = [method, f"{results['lrs'][method]:g}", f"{runs(first, method, 'trainable')[0]:,}"]
        if rec:
            ratios = [r["score"] / r["control"] for r in rec["runs"] if r["method"] == method]
            row += [cell(runs(rec, method), 3), cell(runs(rec, method, "control"), 3), cell(ratios, 4)]
        if ada:
            row.append(cell(runs(ada, method), 3))
        if ari:
            row.append(cell(runs(ari, method), 3))
        walls = [r["wall_s"] for t in (rec, ada, ari) if t for r in t["runs"] if r["method"] == method]
        row.append(f"{statistics.fmean(walls):.0f}")
        rows.append(row)

    goals = []
    if "clover" in methods:
        for other in (m for m in methods if m != "clover"):
            if rec:
                ratio = {m: [r["score"] / r["control"] for r in rec["runs"] if r["method"] == m]
                         for m in ("clover", other)}
                goals.append(f"recovery (ppl relative to the identically tuned base), CLOVER vs {other}: "
                             + verdict(ratio["clover"], ratio[other], higher_is_better=False))
            if ada:
                goals.append(f"adaptation (exact match), CLOVER vs {other}: "
                             + verdict(runs(ada, "clover"), runs(ada, other), higher_is_better=True))
            if ari:
                goals.append(f"arithmetic (accuracy), CLOVER vs {other}: "
                             + verdict(runs(ari, "clover"), runs(ari, other), higher_is_better=True))
    results["goals"] = goals
    title = f"CLOVER vs peft baselines, mean ± sd over seeds {','.join(map(str, results['seeds']))}"
    print_table(title, columns, rows)
    for line in goals:
        print(line)
    if args.no_md:
        return
    n = len(results["seeds"])
    lines = ["## Fine-tuning: CLOVER vs LoRA / PiSSA / DoRA (`benchmarks/finetune_compare.py`)", "",
             f"Command: `{results['command']}`", "", f"Machine: {machine_line(results['machine'])}", "",
             f"SmolLM2-135M; every method: {results['steps']} steps x batch {results['batch']}, constant learning "
             f"rate (one per method, in the table), {n} seeds (data order and adapter initialization); mean ± "
             "sample standard deviation over the seeds. The LoRA family's rank is matched to CLOVER's trainable "
             "count on the same modules.", ""]
    if rec:
        lines += [f"Recovery: V-O 50% whitened prune (16 x 256 validation calibration tokens); WikiText-2 test ppl "
                  f"on {args.eval_windows} windows of 256: base {rec['base_ppl']:.3f}, pruned "
                  f"{rec['pruned_ppl']:.3f}. Tuned on WikiText-2 validation windows of {args.seqlen}; the control "
                  "is the unpruned base tuned with the same method, seed and data.", ""]
    if ada:
        lines += [f"Adaptation: 'shift every digit of a 6-digit string by 3', {args.heldout} held-out exact "
                  f"matches (greedy); base {ada['base_score']:.3f}. Trained on 400 generated examples.", ""]
    if ari:
        lines += [f"Arithmetic: 'What is a + b - c?' (two-digit operands) as a 4-way multiple-choice task scored "
                  f"by lm-evaluation-harness (acc), {args.heldout} held-out questions, distractors one and ten "
                  f"away; base {ari['base_score']:.3f} (chance 0.25). Trained on 600 other generated questions "
                  "with their answers.", ""]
    lines += [markdown_table(columns, rows), "",
              "Verdicts (difference of means against twice its standard error):", ""]
    lines += [f"- {g}" for g in goals]
    update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
