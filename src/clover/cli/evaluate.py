"""``clover eval``: perplexity, lm-eval task accuracy, or an encoder's embedding fidelity to its original."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from ..tasks import PAPER_TASKS
from .common import (DtypeOpt, JsonOpt, ModelArg, TaskDirOpt, TaskLimitOpt, check_model_fits, check_outputs,
                     check_seqlens, console, load, refuse_perplexity, require_causal_lm)
from .report import tasks_from_cli, task_table


def evaluate(
    model: ModelArg,
    ppl: Annotated[str, typer.Option(help="Perplexity corpus (wikitext2).")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Window length in tokens.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate only the first N windows.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA, "
                                                      "else the hub).")] = None,
    compare: Annotated[Optional[str], typer.Option(help="Encoders: instead of perplexity, compare mean-pooled "
                                                        "embeddings with this original model on held-out text.")]
    = None,
    max_texts: Annotated[int, typer.Option(help="--compare: held-out texts embedded (WikiText-2 test rows).")] = 256,
    text_tokens: Annotated[int, typer.Option(help="--compare: tokens per text (longer texts are truncated).")] = 128,
    tasks: Annotated[Optional[str], typer.Option(help="Instead of perplexity, accuracy on these lm-eval tasks "
                                                      "(comma-separated), e.g. " + ",".join(PAPER_TASKS) + ".")]
    = None,
    limit: TaskLimitOpt = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="--tasks: few-shot examples (default: each task's "
                                                            "own).")] = None,
    batch_size: Annotated[int, typer.Option(help="--tasks: harness batch size.")] = 8,
    task_dir: TaskDirOpt = None,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Perplexity on the WikiText-2 test split (rows joined by blank lines, tokenized once, disjoint windows); with
    --tasks, downstream accuracy through lm-evaluation-harness; with --compare ORIGINAL, the embedding fidelity of
    an encoder to the model it was made from."""
    from ..data import load_text
    from ..evaluate import perplexity
    from ..preflight import read_config
    from ..save import write_json

    check_outputs(model, json_path=json_path)
    if ppl != "wikitext2":
        raise CloverError(f"unknown corpus {ppl!r}: clover evaluates perplexity on wikitext2")
    if compare is not None:
        return _compare(model, compare, max_texts, text_tokens, data, json_path, dtype)
    if tasks is not None:
        return _eval_tasks(model, tasks_from_cli(tasks, limit, task_dir, num_fewshot, batch_size), json_path, dtype)
    refuse_perplexity(model, "perplexity")
    check_model_fits(read_config(model), model, {"--seqlen": seqlen}, "eval --ppl (next-token perplexity)")
    text = load_text(corpus=ppl, split="test", data=data)
    loaded = load(model, dtype)
    if loaded.tokenizer is None:
        raise CloverError(f"{model} has no tokenizer: save one next to the weights to evaluate perplexity")
    require_causal_lm(loaded.model, model, "eval --ppl (next-token perplexity)")
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, max_windows=max_windows)
    console.print(f"{model}: wikitext2 test perplexity {result.ppl:.3f} "
                  f"({result.windows} windows x {result.seqlen} tokens, {result.tokens} tokens predicted)")
    if json_path:
        write_json(json_path, {"model": model, "corpus": ppl, "split": "test", "ppl": result.ppl, "nll": result.nll,
                               "windows": result.windows, "tokens": result.tokens, "seqlen": result.seqlen})


def _loaded_for_tasks(model: str, dtype: Optional[str]):
    from ..preflight import read_config

    refuse_perplexity(model, "task accuracy")
    require_causal_lm(read_config(model), model, "task accuracy (multiple-choice log-likelihoods)")
    loaded = load(model, dtype)
    if loaded.tokenizer is None:
        raise CloverError(f"{model} has no tokenizer: save one next to the weights to score tasks")
    require_causal_lm(loaded.model, model, "task accuracy (multiple-choice log-likelihoods)")
    return loaded


def _eval_tasks(model: str, config, json_path: Optional[Path], dtype: Optional[str]) -> None:
    """``eval --tasks``: the harness's accuracy for one model."""
    from ..save import write_json
    from ..tasks import evaluate_tasks

    loaded = _loaded_for_tasks(model, dtype)
    results = evaluate_tasks(loaded.model, loaded.tokenizer, config)
    limit = "" if config.limit is None else f", first {config.limit} documents per task"
    console.print(task_table(f"{model}: lm-eval accuracy{limit}", {"": results.to_dict()}))
    if json_path:
        write_json(json_path, {"model": model, **results.to_dict()})


def _compare(model: str, original: str, max_texts: int, max_length: int, data, json_path, dtype) -> None:
    """``eval --compare``: embedding fidelity of ``model`` to ``original`` (clover.fidelity)."""
    from ..data import load_rows
    from ..fidelity import embedding_fidelity, held_out_texts
    from ..models import resolve
    from ..preflight import read_config
    from ..save import write_json

    resolve(original)  # a typo in either name fails before anything loads
    refuse_perplexity(model, "--compare (text embeddings)")
    check_seqlens(read_config(model), {"--text-tokens": max_length})
    texts = held_out_texts(load_rows(corpus="wikitext2", split="test", data=data), max_texts)
    loaded = load(model, dtype)
    reference = load(original, dtype)
    tokenizer = loaded.tokenizer or reference.tokenizer
    with console.status(f"embedding {len(texts)} held-out texts with both models"):
        result = embedding_fidelity(loaded.model, reference.model, tokenizer, texts, max_length=max_length)
    table = Table(title=f"{model} against {original}: embedding fidelity on {result.texts} WikiText-2 test texts "
                        f"(<= {result.max_length} tokens, mean-pooled last hidden states)")
    for col in ("mean cosine", "min cosine", "similarity rank correlation (Spearman)"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.mean_cosine:.4f}", f"{result.min_cosine:.4f}", f"{result.similarity_spearman:.4f}")
    console.print(table)
    if json_path:
        write_json(json_path, {"model": model, "original": original, "split": "test", **result.to_dict()})
