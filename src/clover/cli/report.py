"""What the rewriting subcommands print and save: perplexity and task accuracy before / after, the size summary
(any ``clover.sizes.SizeReport``), and the per-layer tables' row folding."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.table import Table

from .common import comma_list, console


def tasks_from_cli(tasks: str, limit: Optional[int], task_dir: Optional[Path], num_fewshot: Optional[int] = None,
                   batch_size: int = 8):
    """The harness request from the command line, checked (names, datasets) before any model loads."""
    from ..tasks import TaskConfig, check_tasks

    config = TaskConfig(tasks=list(comma_list(tasks)), limit=limit,
                        num_fewshot=num_fewshot, batch_size=batch_size, task_dir=task_dir)
    with console.status("checking tasks with lm-evaluation-harness"):
        check_tasks(config)
    return config


def task_table(title: str, columns: dict[str, dict]) -> Table:
    """One row per task, one column pair per model scored (``TaskResults.to_dict()`` payloads): acc and acc_norm
    with the harness's standard errors, then the papers' average."""
    first = next(iter(columns.values()))
    table = Table(title=title)
    table.add_column("task")
    table.add_column("n", justify="right")
    for name in columns:
        for metric in ("acc", "acc_norm"):
            table.add_column(f"{name} {metric}".strip(), justify="right")

    def cell(value, stderr):
        return "-" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")

    for i, score in enumerate(first["tasks"]):
        row = [score["task"], "-" if score["documents"] is None else str(score["documents"])]
        for results in columns.values():
            s = results["tasks"][i]
            row += [cell(s["acc"], s["acc_stderr"]), cell(s["acc_norm"], s["acc_norm_stderr"])]
        table.add_row(*row)
    average = ["average (acc_norm, else acc)", ""]
    for results in columns.values():
        average += [f"{results['average']:.4f}", ""]
    table.add_row(*average)
    return table


def test_ppl(model, tokenizer, text, seqlen, max_windows):
    from ..evaluate import perplexity

    return perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=max_windows, progress=True).ppl


def test_text(eval_ppl: bool, data) -> str | None:
    """WikiText-2 test text for --eval-ppl, read before any weights load (a missing corpus fails at once)."""
    if not eval_ppl:
        return None
    from ..data import load_text

    return load_text(corpus="wikitext2", split="test", data=data)


def before_after(model: str, report, loaded, rewritten, text, task_config, seqlen: int, max_windows) -> dict:
    """The report as JSON, with perplexity (when ``text``) and task accuracy (when ``task_config``) before/after."""
    payload = {"model": model, **report.to_dict()}
    if text is not None:
        add_ppl(payload, loaded, rewritten, text, seqlen, max_windows)
    if task_config is not None:
        add_tasks(payload, loaded, rewritten, task_config)
    return payload


def add_ppl(payload: dict, loaded, rewritten, text, seqlen: int, max_windows) -> None:
    """Test perplexity of the original and of the rewritten model into the report payload."""
    payload["ppl_before"] = test_ppl(loaded.model, loaded.tokenizer, text, seqlen, max_windows)
    payload["ppl_after"] = test_ppl(rewritten, loaded.tokenizer, text, seqlen, max_windows)
    payload["ppl_protocol"] = {"seqlen": seqlen, "max_windows": max_windows, "split": "test"}


def add_tasks(payload: dict, loaded, rewritten, config) -> None:
    """lm-eval accuracy of the original and of the rewritten model, same tokenizer and harness options, into the
    payload (``print_summary`` shows them)."""
    from ..tasks import evaluate_tasks

    before = evaluate_tasks(loaded.model, loaded.tokenizer, config)
    after = evaluate_tasks(rewritten, loaded.tokenizer, config)
    payload["tasks_before"], payload["tasks_after"] = before.to_dict(), after.to_dict()


def print_summary(report, payload: dict) -> None:
    """Parameters, KV bytes per token (and perplexity, when measured) before and after, then the report's notes
    and a warning when the output is larger than its input (any ``clover.sizes.SizeReport``)."""
    summary = Table(title="summary")
    for col in ("", "before", "after", "after / before"):
        summary.add_column(col, justify="right")
    rows = [("parameters", report.params_before, report.params_after),
            ("KV-cache bytes / token", report.kv_bytes_per_token_before, report.kv_bytes_per_token_after)]
    if "ppl_after" in payload:
        rows.append(("WikiText-2 test ppl", payload["ppl_before"], payload["ppl_after"]))
    if "tasks_after" in payload:
        rows.append(("task accuracy (average)", payload["tasks_before"]["average"], payload["tasks_after"]["average"]))
    for name, before, after in rows:
        fmt = (lambda v: f"{v:,.3f}") if isinstance(before, float) else (lambda v: f"{v:,}")
        summary.add_row(name, fmt(before), fmt(after), f"{after / before:.3f}" if before else "-")  # UNet: no KV
    console.print(summary)
    if "tasks_after" in payload:
        console.print(task_table("lm-eval accuracy", {"before": payload["tasks_before"],
                                                      "after": payload["tasks_after"]}))
    for note in report.notes:
        console.print(f"note: {note}")
    if report.params_after > report.params_before:  # a rewrite meant to compress grew the model: say it plainly
        console.print(f"[yellow]warning:[/] the output has {report.params_after / report.params_before - 1:.1%} more "
                      f"parameters than the input ({report.params_before:,} -> {report.params_after:,})")


def stack_name(lr) -> str:
    """The block's stack (Whisper: encoder / decoder / cross), else its name with the layer number starred: tells
    stacks apart (Mllama: vision / text, self / cross)."""
    return getattr(lr, "stack", "") or ".".join("*" if part == str(lr.layer) else part for part in lr.site.split("."))


def runs_of_equal(layers, cells) -> list[tuple[str, tuple]]:
    """Consecutive layers whose ``cells(layer)`` agree collapse into one row ("0-29")."""
    rows: list[tuple[list[int], tuple]] = []
    for lr in layers:
        row = cells(lr)
        if rows and rows[-1][1] == row and rows[-1][0][-1] == lr.layer - 1:
            rows[-1][0].append(lr.layer)
        else:
            rows.append(([lr.layer], row))
    return [(f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]), row) for ids, row in rows]


def loads_how(model) -> str:
    if model.config.model_type.startswith("clover_"):
        return ("loads with AutoModelForCausalLM.from_pretrained after `import clover`, or with "
                "trust_remote_code=True without clover")
    return "a stock transformers class: loads with AutoModelForCausalLM.from_pretrained"
