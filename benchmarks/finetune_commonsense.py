"""The CLOVER paper's fine-tuning setting: a LLaMA-family model tuned on the commonsense training mix, CLOVER
against LoRA r=32 / DoRA / PiSSA at matched trainable parameters, scored on the eight commonsense tasks through
lm-evaluation-harness.

    python benchmarks/finetune_commonsense.py --model meta-llama/Llama-3.2-1B [--methods clover,lora,dora,pissa]
        [--lora-r 32] [--steps 2000] [--batch-size 16] [--seqlen 256] [--lrs clover=1e-4,lora=2e-4,...]
        [--seeds 0] [--limit N] [--dtype bfloat16] [--json benchmarks/results/finetune_commonsense.json] [--no-md]

This needs the Hugging Face hub (the model, ``zwhe99/commonsense_170k`` -- LLM-Adapters' commonsense mix -- and
the tasks' datasets) and, at the paper's scale, a GPU; it fails at once with one line where either is missing.
``--train-data`` (a JSON-lines file with ``instruction`` and ``output`` fields) and ``--task-dir`` (local task
YAMLs) replace the hub parts, which is how the tests run it on a tiny model.

What it does, per method and seed: tune a fresh copy of the model on the training mix formatted with the
LLM-Adapters prompt (instruction, then "### Response:" and the answer; packed into ``--seqlen`` windows), merge,
and score the tasks with the harness (zero-shot, its own prompts; acc_norm where reported, else acc). CLOVER's
targets are the subset whose trainable count is closest to LoRA at ``--lora-r`` on the same modules
(``match_lora_r``); LoRA, DoRA and PiSSA come from peft at rank ``--lora-r``. The untuned base is scored too.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
except ImportError:  # pragma: no cover - imported as benchmarks.finetune_commonsense
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json

from clover.errors import CloverError
from clover.finetune.data import token_windows
from clover.finetune.train import FinetuneConfig, train
from clover.models import load
from clover.tasks import TaskConfig, check_tasks, evaluate_tasks

SECTION = "finetune_commonsense"
TASKS = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
DATASET = "zwhe99/commonsense_170k"
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")
LRS = "clover=1e-4,lora=2e-4,dora=2e-4,pissa=2e-5"


def training_texts(path: str | None, max_examples: int | None) -> list[str]:
    """The commonsense mix as prompt + answer texts, from ``path`` (JSON lines) or the hub."""
    if path:
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    else:
        from datasets import load_dataset

        try:
            records = load_dataset(DATASET, split="train")
        except (ConnectionError, OSError) as exc:
            raise CloverError(f"the training mix {DATASET} could not be loaded ({str(exc).splitlines()[0]}): run on "
                              "a machine that reaches the Hugging Face hub, or pass --train-data FILE.jsonl") from None
    texts = [PROMPT.format(instruction=r["instruction"], output=r["output"]) for r in records]
    return texts[:max_examples] if max_examples else texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    parser.add_argument("--methods", default="clover,lora,dora,pissa")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lrs", default=LRS, help="one learning rate per method, METHOD=LR,...")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="documents per task (a quick look)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--train-data", default=None, help="JSON lines with instruction / output (else the hub)")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--task-dir", default=None, help="extra lm-eval task YAMLs (local data)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default="benchmarks/results/finetune_commonsense.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    lrs = {k.strip(): float(v) for k, v in (item.split("=") for item in args.lrs.split(","))}
    seeds = [int(s) for s in args.seeds.split(",")]
    task_config = TaskConfig(tasks=[t.strip() for t in args.tasks.split(",")], limit=args.limit,
                             batch_size=args.eval_batch_size, task_dir=args.task_dir, progress=False)
    try:
        missing = [m for m in methods if m not in lrs]
        if missing:
            raise CloverError(f"--lrs has no learning rate for {', '.join(missing)}")
        check_tasks(task_config)  # unreachable task data fails here, before any training
        texts = training_texts(args.train_data, args.max_examples)
        import torch

        lm = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
        if torch.cuda.is_available():
            lm.model.to("cuda")
        dataset = token_windows(lm.tokenizer, texts, args.seqlen)
    except CloverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

    results = {"machine": machine_info(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
               "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen,
               "lora_r": args.lora_r, "seeds": seeds, "lrs": {m: lrs[m] for m in methods},
               "base": evaluate_tasks(lm.model, lm.tokenizer, task_config).to_dict(), "runs": []}
    for method in methods:
        for seed in seeds:
            config = FinetuneConfig(method=method, lora_r=args.lora_r,
                                    match_lora_r=args.lora_r if method == "clover" else None, steps=args.steps,
                                    lr=lrs[method], batch_size=args.batch_size, seqlen=args.seqlen, seed=seed,
                                    save_steps=10 ** 9, logging_steps=max(1, args.steps // 20), resume=False)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as run_dir:
                tuned, result = train(copy.deepcopy(lm.model), lm.tokenizer, dataset, config, run_dir,
                                      model_name=args.model, progress=True)
            wall = time.perf_counter() - start
            scored = evaluate_tasks(tuned, lm.tokenizer, task_config).to_dict()
            results["runs"].append({"method": method, "seed": seed, "trainable": result.trainable,
                                    "train_loss": result.train_loss, "wall_s": wall, "tasks": scored})
            print(f"{method} seed {seed}: average {scored['average']:.4f}, {result.trainable:,} trainable, "
                  f"{wall:.0f} s", flush=True)
            del tuned
    render(results, write_md=not args.no_md)
    write_json(args.json, results)
    return results


def render(results: dict, write_md: bool = True) -> None:
    names = [t["task"] for t in results["base"]["tasks"]]
    columns = ["method", "trainable"] + names + ["average"]
    rows = [["base (untuned)", "0"] + [f"{t['headline']:.4f}" for t in results["base"]["tasks"]]
            + [f"{results['base']['average']:.4f}"]]
    for method in results["lrs"]:
        runs = [r for r in results["runs"] if r["method"] == method]

        def mean(values):
            values = list(values)
            sd = statistics.stdev(values) if len(values) > 1 else None
            return f"{statistics.fmean(values):.4f}" + ("" if sd is None else f" ± {sd:.4f}")

        rows.append([f"{method} (lr {results['lrs'][method]:g})", f"{runs[0]['trainable']:,}"]
                    + [mean(t["headline"] for r in runs for t in r["tasks"]["tasks"] if t["task"] == name)
                       for name in names] + [mean(r["tasks"]["average"] for r in runs)])
    title = f"{results['model']}: commonsense tuning, acc_norm where reported, else acc"
    print_table(title, columns, rows)
    if not write_md:
        return
    lines = ["## Fine-tuning, the paper's setting (`benchmarks/finetune_commonsense.py`)", "",
             f"Command: `{results['command']}`", "", f"Machine: {machine_line(results['machine'])}", "",
             f"{results['model']} tuned for {results['steps']} steps x batch {results['batch_size']} x "
             f"{results['seqlen']} tokens on the commonsense mix; LoRA-family rank {results['lora_r']}, CLOVER "
             f"matched to its trainable count; seeds {','.join(map(str, results['seeds']))}; zero-shot accuracy "
             "through lm-evaluation-harness.", "", markdown_table(columns, rows)]
    update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
