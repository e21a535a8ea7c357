"""The ``clover`` command: thin subcommands over the library's verbs, tables on screen, JSON on request.

Every user-facing failure is a ``CloverError`` and ends as one line on stderr with exit code 2.
"""

from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CloverError
from .tasks import PAPER_TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CLOVER: cross-layer orthogonal vectors for transformer attention.")
console = Console()
err_console = Console(stderr=True)

DTYPES = ("float32", "bfloat16", "float16")


def _fails_cleanly(fn):
    """Turn a CloverError into one line on stderr and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CloverError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _torch_dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise CloverError(f"unknown --dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _load(model: str, dtype: Optional[str]):
    from .models import load

    with console.status(f"loading {model}"):
        return load(model, dtype=_torch_dtype(dtype))


ModelArg = Annotated[str, typer.Argument(help="A registry name (smollm2-135m), a local directory, or a hub id.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="Load weights in this dtype (float32, bfloat16, float16).")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON here.")]
EvalPplOpt = Annotated[bool, typer.Option(help="Report WikiText-2 test perplexity before and after.")]
SeqlenOpt = Annotated[int, typer.Option(help="Perplexity window length.")]
MaxWindowsOpt = Annotated[Optional[int], typer.Option(help="Perplexity on the first N windows only.")]
DataOpt = Annotated[Optional[Path], typer.Option(help="Evaluation corpus folder (for --eval-ppl).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace --out if it exists.")]
CalibOpt = Annotated[Optional[Path], typer.Option(help="Calibration corpus folder (WikiText-2 validation split; else "
                                                      "$CLOVER_DATA, else the hub).")]
CalibSeqlenOpt = Annotated[int, typer.Option(help="Tokens per calibration window.")]
TaskLimitOpt = Annotated[Optional[int], typer.Option(help="Task accuracy: score only the first N documents of "
                                                            "each task (a quick look; papers use all).")]
TaskDirOpt = Annotated[Optional[Path], typer.Option(help="Task accuracy: a folder of extra lm-eval task YAMLs "
                                                         "(local data).")]
EvalTasksOpt = Annotated[Optional[str], typer.Option(help="Also report lm-eval task accuracy before and after "
                                                          "(comma-separated task names).")]
StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Convert layer by layer from the safetensors shards (memory: about one layer). "
    "Default: on for folders with model.safetensors.index.json.")]


def _streams(model: str, stream: Optional[bool]) -> bool:
    """Whether to take the streaming path (clover.streaming) for this model argument."""
    from .streaming import is_streamable

    if stream is None:
        return is_streamable(model)
    if stream and not Path(model).is_dir():
        raise CloverError(f"--stream needs a local checkpoint folder with safetensors weights, not {model!r}: "
                          "save the model with save_pretrained first, or drop --stream")
    if stream:
        from .models import resolve

        if resolve(model).library == "diffusers":
            raise CloverError(f"--stream converts transformers checkpoints only and {model} is a diffusers model: "
                              "drop --stream (a UNet fits in memory)")
    return stream


def _refuse_perplexity(model: str, what: str) -> None:
    """Perplexity scores text with a language model; a diffusers model (a UNet) reads none. Checked before any
    corpus or weights are loaded."""
    from .models import resolve

    if resolve(model).library == "diffusers":
        raise CloverError(f"{what} needs a language model and {model} is a diffusers model, which reads no text: "
                          "judge it in its diffusion pipeline instead" + (f", and drop {what}"
                                                                           if what.startswith("--eval") else ""))


def _check_outputs(model: str, *, out: Optional[Path] = None, overwrite: bool = False,
                   json_path: Optional[Path] = None, plot: Optional[Path] = None) -> None:
    """Every path the command will write, checked before anything loads (nothing is written on failure)."""
    from .preflight import check_json, check_out_dir, check_plot

    if out is not None:
        check_out_dir(out, overwrite, model)
    check_json(json_path)
    check_plot(plot)


def _task(config_or_model) -> Optional[str]:
    """The head of a config (from its architectures) or of a loaded model, as a modeling CLASSES key."""
    from . import modeling
    from .preflight import architecture

    if config_or_model is None:
        return None
    if hasattr(config_or_model, "forward"):
        return modeling.task_of(config_or_model)
    name = architecture(config_or_model)
    return modeling.task_of_architecture(name) if name else None


def _require_causal_lm(config_or_model, model: str, what: str) -> None:
    """Next-token perplexity and causal-LM training mean nothing for other heads: refuse them by name."""
    from . import modeling

    task = _task(config_or_model)
    if task is None or task == "causal_lm":
        return
    name = modeling.TASK_NAMES.get(task, task)
    fix = {"masked_lm": "for an encoder, compare it with its original: clover eval MODEL --compare ORIGINAL",
           "base": "for an encoder, compare it with its original: clover eval MODEL --compare ORIGINAL",
           "speech_seq2seq": "judge a speech model by its word error rate in your own pipeline"}.get(
        task, "use a causal-LM checkpoint (architectures *ForCausalLM)")
    raise CloverError(f"{what} needs a causal language model and {model} is a {name}: {fix}")


def _check_seqlens(config, seqlens: dict[str, int]) -> None:
    """Each ``{flag: tokens}`` fits the model's context (a no-op where the config is not known yet)."""
    from .preflight import check_seqlen

    for flag, tokens in seqlens.items():
        check_seqlen(config, tokens, flag)


def _check_model(target, model: str, seqlens: dict[str, int], causal_for: Optional[str] = None) -> None:
    """The checks that need the model: run on its config.json before loading (``target`` a config, or None where
    reading it is not cheap) and again on the loaded model (GGUF and hub models are only known then).
    ``causal_for`` names what needs a causal LM, if anything."""
    if causal_for:
        _require_causal_lm(target, model, causal_for)
    _check_seqlens(getattr(target, "config", target), seqlens)


def _ranks_cell(ranks: list[int]) -> str:
    """Per-head counts when there are few heads, else min / median / max."""
    if len(ranks) <= 4:
        return ",".join(map(str, ranks))
    return f"{min(ranks)} / {statistics.median(ranks):g} / {max(ranks)}"


@app.command()
@_fails_cleanly
def inspect(
    model: ModelArg,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of normalised spectra per layer.")] = None,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Singular values of every head's Q-K and V-O pair, and how many directions hold 90% / 99% of each."""
    from .save import write_json
    from .spectra import collect_spectra, plot_spectra, spectra_to_json

    _check_outputs(model, json_path=json_path, plot=plot)
    loaded = _load(model, dtype)
    rows = collect_spectra(loaded.model)
    head_dim = {r.kind: len(r.singular_values[0]) for r in rows}
    many = len(rows[0].singular_values) > 4
    table = Table(title=f"{model}: directions holding 90% / 99% of each head's squared spectrum"
                  + (" (min / median / max over heads)" if many else " (per KV group)"))
    for col in ("layer", "block", f"Q-K 90% (of {head_dim['qk']})", "Q-K 99%",
                f"V-O 90% (of {head_dim['vo']})", "V-O 99%"):
        table.add_column(col, justify="right" if col != "block" else "left")
    by_site: dict[str, dict] = {}
    several = len({_stack(r) for r in rows}) > 1  # several attention stacks (Mllama): name the stack
    for r in rows:
        layer = f"{_stack(r)} {r.layer}" if several else str(r.layer)
        by_site.setdefault(r.site, {"layer": layer, "role": r.stack or r.role})[r.kind] = r
    for site in by_site.values():
        qk, vo = site["qk"], site["vo"]
        qk_note = "" if qk.exact else "*"
        table.add_row(site["layer"], site["role"],
                      _ranks_cell(qk.energy_ranks(0.90)) + qk_note, _ranks_cell(qk.energy_ranks(0.99)) + qk_note,
                      _ranks_cell(vo.energy_ranks(0.90)), _ranks_cell(vo.energy_ranks(0.99)))
    console.print(table)
    if not all(r.exact for r in rows):
        console.print("* rotary embeddings (or a norm on q and k, as in Mllama's cross-attention) sit between Q and "
                      "K: this Q-K spectrum is of the product W_q W_k^T alone and is not an exact CLOVER pair "
                      "(V-O is).")
    if plot:
        plot_spectra(rows, str(plot), title=model)
        console.print(f"spectra plot written to {plot}")
    if json_path:
        write_json(json_path, {"model": model, "pairs": spectra_to_json(rows)})
        console.print(f"JSON written to {json_path}")


@app.command()
@_fails_cleanly
def orthogonalize(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the rewritten model in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    pairs: Annotated[str, typer.Option(help="Pairs to rewrite: qk, vo or qk,vo.")] = "qk,vo",
    compute_dtype: Annotated[str, typer.Option(help="SVD precision: float64 or float32.")] = "float64",
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
    stream: StreamOpt = None,
):
    """Rewrite every head so its dims are orthogonal and sorted by singular value; prove nothing changed; save."""
    import torch

    from .orthogonalize import OrthogonalizeConfig, check_config, orthogonalize_
    from .save import save_model, write_json

    _check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    if compute_dtype not in ("float64", "float32"):
        raise CloverError(f"unknown --compute-dtype {compute_dtype!r}: use float64 or float32")
    kinds = tuple(p.strip() for p in pairs.split(",") if p.strip())
    check_config(OrthogonalizeConfig(pairs=kinds))
    if _streams(model, stream):
        from .streaming import StreamOptions, stream_orthogonalize

        report = stream_orthogonalize(model, out, OrthogonalizeConfig(pairs=kinds, compute_dtype=getattr(
            torch, compute_dtype)), StreamOptions(dtype=_torch_dtype(dtype), overwrite=overwrite))
        counts = {f"{k} {st}": sum(p["kind"] == k and p["status"] == st for p in report["pairs"])
                  for k in kinds for st in ("rewritten", "skipped")}
        console.print(f"streamed layer by layer: {counts}; every block's products checked against the original; "
                      f"saved to {out}")
        if json_path:
            write_json(json_path, report)
        return
    loaded = _load(model, dtype)
    report = orthogonalize_(loaded.model, OrthogonalizeConfig(pairs=kinds, compute_dtype=getattr(torch, compute_dtype)))

    table = Table(title=f"{model}: orthogonalized")
    for col in ("pair", "blocks rewritten", "blocks skipped", "why skipped"):
        table.add_column(col)
    for kind in kinds:
        done = [p for p in report.pairs if p.kind == kind and p.status == "rewritten"]
        skipped = [p for p in report.pairs if p.kind == kind and p.status == "skipped"]
        reasons = sorted({p.reason for p in skipped})
        table.add_row({"qk": "Q-K", "vo": "V-O"}.get(kind, kind), str(len(done)), str(len(skipped)), "; ".join(reasons))
    console.print(table)
    check = report.check
    console.print(f"lossless check: max |logit diff| = {check.max_abs_diff:.3e}, "
                  f"logit scale = {check.logit_scale:.3e}, "
                  f"relative = {check.relative_diff:.3e} (tolerance {check.tolerance:.0e}) -> "
                  + ("[green]PASSED[/]" if check.passed else "[red]FAILED[/]"))
    payload = {"model": model, **report.to_dict()}
    save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out}")
    if json_path:
        write_json(json_path, payload)


@app.command(name="eval")
@_fails_cleanly
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
    from .data import load_text
    from .evaluate import perplexity
    from .preflight import read_config
    from .save import write_json

    _check_outputs(model, json_path=json_path)
    if ppl != "wikitext2":
        raise CloverError(f"unknown corpus {ppl!r}: clover evaluates perplexity on wikitext2")
    if compare is not None:
        return _compare(model, compare, max_texts, text_tokens, data, json_path, dtype)
    if tasks is not None:
        return _eval_tasks(model, _task_config(tasks, limit, task_dir, num_fewshot, batch_size), json_path, dtype)
    _refuse_perplexity(model, "perplexity")
    _check_model(read_config(model), model, {"--seqlen": seqlen}, "eval --ppl (next-token perplexity)")
    text = load_text(corpus=ppl, split="test", data=data)
    loaded = _load(model, dtype)
    if loaded.tokenizer is None:
        raise CloverError(f"{model} has no tokenizer: save one next to the weights to evaluate perplexity")
    _require_causal_lm(loaded.model, model, "eval --ppl (next-token perplexity)")
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, max_windows=max_windows)
    console.print(f"{model}: wikitext2 test perplexity {result.ppl:.3f} "
                  f"({result.windows} windows x {result.seqlen} tokens, {result.tokens} tokens predicted)")
    if json_path:
        write_json(json_path, {"model": model, "corpus": ppl, "split": "test", "ppl": result.ppl, "nll": result.nll,
                               "windows": result.windows, "tokens": result.tokens, "seqlen": result.seqlen})


def _task_config(tasks: str, limit: Optional[int], task_dir: Optional[Path], num_fewshot: Optional[int] = None,
                 batch_size: int = 8):
    """The harness request from the command line, checked (names, datasets) before any model loads."""
    from .tasks import TaskConfig, check_tasks

    config = TaskConfig(tasks=[t.strip() for t in tasks.split(",") if t.strip()], limit=limit,
                        num_fewshot=num_fewshot, batch_size=batch_size, task_dir=task_dir)
    with console.status("checking tasks with lm-evaluation-harness"):
        check_tasks(config)
    return config


def _loaded_for_tasks(model: str, dtype: Optional[str]):
    from .preflight import read_config

    _refuse_perplexity(model, "task accuracy")
    _require_causal_lm(read_config(model), model, "task accuracy (multiple-choice log-likelihoods)")
    loaded = _load(model, dtype)
    if loaded.tokenizer is None:
        raise CloverError(f"{model} has no tokenizer: save one next to the weights to score tasks")
    _require_causal_lm(loaded.model, model, "task accuracy (multiple-choice log-likelihoods)")
    return loaded


def _task_table(title: str, columns: dict[str, dict]) -> Table:
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


def _eval_tasks(model: str, config, json_path: Optional[Path], dtype: Optional[str]) -> None:
    """``eval --tasks``: the harness's accuracy for one model."""
    from .save import write_json
    from .tasks import evaluate_tasks

    loaded = _loaded_for_tasks(model, dtype)
    results = evaluate_tasks(loaded.model, loaded.tokenizer, config)
    limit = "" if config.limit is None else f", first {config.limit} documents per task"
    console.print(_task_table(f"{model}: lm-eval accuracy{limit}", {"": results.to_dict()}))
    if json_path:
        write_json(json_path, {"model": model, **results.to_dict()})


def _compare(model: str, original: str, max_texts: int, max_length: int, data, json_path, dtype) -> None:
    """``eval --compare``: embedding fidelity of ``model`` to ``original`` (clover.fidelity)."""
    from .data import load_rows
    from .fidelity import embedding_fidelity, held_out_texts
    from .models import resolve
    from .preflight import read_config
    from .save import write_json

    resolve(original)  # a typo in either name fails before anything loads
    _refuse_perplexity(model, "--compare (text embeddings)")
    _check_seqlens(read_config(model), {"--text-tokens": max_length})
    texts = held_out_texts(load_rows(corpus="wikitext2", split="test", data=data), max_texts)
    loaded = _load(model, dtype)
    reference = _load(original, dtype)
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


CriterionOpt = Annotated[str, typer.Option(help="vanilla (norm product), clover (SVD) or whitened (data-aware).")]


def _calibration(loaded, calib: Optional[Path], samples: int, seqlen: int):
    """Token windows from the validation split (never the test split), for data-aware criteria.

    A diffusers model (a UNet) reads no text: its adapter turns each row into seeded random latents and
    embeddings shaped like it, so it gets seeded random ids of the asked shape and needs no corpus."""
    import torch

    from .data import calibration_batches, load_rows

    source = getattr(loaded, "source", None)
    if source is not None and source.library == "diffusers":
        if samples < 1 or seqlen < 1:
            raise CloverError(f"calibration needs --calib-samples and --calib-seqlen >= 1, got {samples} and {seqlen}")
        return torch.randint(0, 2**15, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    if loaded.tokenizer is None:
        raise CloverError("the model folder has no tokenizer, which data-aware criteria need for calibration text: "
                          "save the tokenizer next to the weights, or use --criterion clover")
    rows = load_rows(corpus="wikitext2", split="validation", data=calib)
    return calibration_batches(loaded.tokenizer, rows, samples, seqlen)


def _tokenizer_only(model: str):
    """For a streamed prune: the folder's tokenizer (calibration needs it), without loading any weights."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    try:
        return SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(model))
    except Exception:  # transformers raises many kinds; all mean "no usable tokenizer here"
        return SimpleNamespace(tokenizer=None)


def _ppl(model, tokenizer, text, seqlen, max_windows):
    from .evaluate import perplexity

    return perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=max_windows, progress=True).ppl


def _test_text(eval_ppl: bool, data) -> str | None:
    """WikiText-2 test text for --eval-ppl, read before any weights load (a missing corpus fails at once)."""
    if not eval_ppl:
        return None
    from .data import load_text

    return load_text(corpus="wikitext2", split="test", data=data)


def _payload(model: str, report, loaded, rewritten, text, task_config, seqlen: int, max_windows) -> dict:
    """The report as JSON, with perplexity (when ``text``) and task accuracy (when ``task_config``) before/after."""
    payload = {"model": model, **report.to_dict()}
    if text is not None:
        _add_ppl(payload, loaded, rewritten, text, seqlen, max_windows)
    if task_config is not None:
        _add_tasks(payload, loaded, rewritten, task_config)
    return payload


def _add_ppl(payload: dict, loaded, rewritten, text, seqlen: int, max_windows) -> None:
    """Test perplexity of the original and of the rewritten model into the report payload."""
    payload["ppl_before"] = _ppl(loaded.model, loaded.tokenizer, text, seqlen, max_windows)
    payload["ppl_after"] = _ppl(rewritten, loaded.tokenizer, text, seqlen, max_windows)
    payload["ppl_protocol"] = {"seqlen": seqlen, "max_windows": max_windows, "split": "test"}


def _add_tasks(payload: dict, loaded, rewritten, config) -> None:
    """lm-eval accuracy of the original and of the rewritten model, same tokenizer and harness options, into the
    payload (``_print_summary`` shows them)."""
    from .tasks import evaluate_tasks

    before = evaluate_tasks(loaded.model, loaded.tokenizer, config)
    after = evaluate_tasks(rewritten, loaded.tokenizer, config)
    payload["tasks_before"], payload["tasks_after"] = before.to_dict(), after.to_dict()


def _print_summary(report, payload: dict) -> None:
    """Parameters, KV bytes per token (and perplexity, when measured) before and after, then the report's notes."""
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
        console.print(_task_table("lm-eval accuracy", {"before": payload["tasks_before"],
                                                       "after": payload["tasks_after"]}))
    for note in report.notes:
        console.print(f"note: {note}")


def _needs_calibration(*criteria: Optional[str]) -> bool:
    from .criteria import DATA_AWARE

    return any(c in DATA_AWARE for c in criteria if c)


def _stack(lr) -> str:
    """The block's stack (Whisper: encoder / decoder / cross), else its name with the layer number starred: tells
    stacks apart (Mllama: vision / text, self / cross)."""
    return getattr(lr, "stack", "") or ".".join("*" if part == str(lr.layer) else part for part in lr.site.split("."))


def _runs_of_equal_dims(layers) -> list[tuple[str, tuple[str, str]]]:
    """Consecutive layers with the same dims collapse into one row ("0-29"), so uniform prunes stay short; models
    with several attention stacks (Mllama) get the stack in front of the layer numbers."""
    rows: list[tuple[str, list[int], tuple[str, str]]] = []
    for lr in layers:
        dims = (f"{lr.qk_before} -> {lr.qk_dim}", f"{lr.vo_before} -> {lr.vo_dim}")
        if rows and rows[-1][2] == dims and rows[-1][0] == _stack(lr) and rows[-1][1][-1] == lr.layer - 1:
            rows[-1][1].append(lr.layer)
        else:
            rows.append((_stack(lr), [lr.layer], dims))
    several = len({stack for stack, _, _ in rows}) > 1
    return [((f"{stack} " if several else "") + (f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])), dims)
            for stack, ids, dims in rows]


@app.command()
@_fails_cleanly
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the pruned model in.")],
    qk_ratio: Annotated[float, typer.Option(help="Fraction of Q-K head dims to remove, in [0, 1).")] = 0.0,
    vo_ratio: Annotated[float, typer.Option(help="Fraction of V-O head dims to remove, in [0, 1).")] = 0.0,
    criterion: CriterionOpt = "whitened",
    qk_criterion: Annotated[Optional[str], typer.Option(
        help="Override for Q-K. Rotary models: rotary-weight or rotary-activation (whole frequency pairs).")] = None,
    qk_threshold: Annotated[Optional[float], typer.Option(help="Remove Q-K directions with singular value "
                                                                "<= this (replaces --qk-ratio).")] = None,
    vo_threshold: Annotated[Optional[float], typer.Option(help="Remove V-O directions with singular value "
                                                                "<= this (replaces --vo-ratio).")] = None,
    allocation: Annotated[str, typer.Option(help="uniform: same ratio per layer; global: one budget, removing the "
                                                 "units with the smallest share of their layer's score.")] = "uniform",
    vo_whitening: Annotated[str, typer.Option(help="whitened V-O: mixed (attention-mixed values, default) or "
                                                   "input (layer inputs).")] = "mixed",
    sequential: Annotated[bool, typer.Option(help="Data-aware criteria: measure each layer with the earlier "
                                                  "layers already pruned (single-stack models).")] = False,
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (UNet: samples of seeded random latents "
                                                    "and text embeddings; no corpus is read).")] = 16,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window (UNet: text-embedding tokens "
                                                   "per sample).")] = 512,
    calib_features: Annotated[Optional[Path], typer.Option(help="Whisper: log-mel features (.pt or .npy, n x mel "
                                                                "bins x frames) for the encoder's calibration, "
                                                                "instead of synthetic audio.")] = None,
    calib_audio: Annotated[Optional[Path], typer.Option(help="Whisper: a folder of .wav / .flac speech for the "
                                                             "encoder's calibration, turned into features by the "
                                                             "model's own feature extractor.")] = None,
    stack: Annotated[Optional[list[str]], typer.Option(
        help="Per attention stack (Whisper: encoder, decoder, cross), repeatable: NAME:AMOUNT=V[,AMOUNT=V] with "
             "AMOUNT one of qk-ratio, vo-ratio, qk-threshold, vo-threshold, e.g. --stack encoder:vo-ratio=0.5. "
             "Only the named stacks are pruned; replaces --qk-ratio / --vo-ratio.")] = None,
    eval_ppl: EvalPplOpt = False,
    seqlen: SeqlenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    data: DataOpt = None,
    eval_tasks: EvalTasksOpt = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
    stream: StreamOpt = None,
):
    """Remove the least important head directions: smaller Q/K/V/O weights and a smaller KV cache."""
    from . import modeling
    from .preflight import read_config
    from .prune import PruneConfig, check_runtime, prune as run_prune
    from .save import save_model, write_json

    _check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = PruneConfig(qk_ratio=qk_ratio, vo_ratio=vo_ratio, criterion=criterion, qk_criterion=qk_criterion,
                         qk_threshold=qk_threshold, vo_threshold=vo_threshold, allocation=allocation,
                         vo_whitening=vo_whitening, sequential=sequential,
                         stacks=_parse_stacks(stack) if stack else None)
    config.check()
    if calib_features is not None and calib_audio is not None:
        raise CloverError("--calib-features and --calib-audio both given: pass one source of encoder calibration")
    calibrates = _needs_calibration(config.pair_criterion("qk") if config.active("qk") else None,
                                    config.pair_criterion("vo") if config.active("vo") else None)
    seqlens = {**({"--calib-seqlen": calib_seqlen} if calibrates else {}), **({"--seqlen": seqlen} if eval_ppl else {})}
    if eval_ppl:
        _refuse_perplexity(model, "--eval-ppl")
    streaming = _streams(model, stream)
    if streaming and (eval_ppl or eval_tasks):
        flag = "--eval-ppl" if eval_ppl else "--eval-tasks"
        raise CloverError(f"{flag} needs the whole model in memory: run `clover eval` on the streamed output, "
                          "or pass --no-stream")
    causal_for = "--eval-ppl (next-token perplexity)" if eval_ppl else None
    if eval_tasks:
        _refuse_perplexity(model, "--eval-tasks")
        causal_for = causal_for or "--eval-tasks (multiple-choice log-likelihoods)"
    task_config = _task_config(eval_tasks, task_limit, task_dir) if eval_tasks else None
    peeked = read_config(model)
    if peeked is not None:  # the head and the lengths, from config.json alone
        modeling.check_prunable(peeked)
        _check_model(peeked, model, seqlens, causal_for)
    text = _test_text(eval_ppl, data)
    loaded = _tokenizer_only(model) if streaming else _load(model, dtype)
    if not streaming:
        check_runtime(loaded.model)
        # A UNet's --calib-seqlen counts text-embedding tokens, not positions of a context.
        _check_model(loaded.model, model, seqlens if loaded.source.library == "transformers" else {}, causal_for)
    if calibrates:
        config.calibration = _calibration(loaded, calib, calib_samples, calib_seqlen)
    if calib_features is not None:
        from .adapters.whisper import load_calibration_features

        load_calibration_features(loaded.model, calib_features)
    if calib_audio is not None:
        from .adapters.whisper import require_whisper, set_calibration_features
        from .audio import log_mel_from_folder

        require_whisper(getattr(loaded, "model", None), "--calib-audio")
        set_calibration_features(loaded.model, log_mel_from_folder(calib_audio, model, loaded.model.config))
    if streaming:
        from .streaming import StreamOptions, stream_prune

        report = stream_prune(model, out, config, StreamOptions(dtype=_torch_dtype(dtype), overwrite=overwrite))
        pruned = None
    else:
        pruned, report = run_prune(loaded.model, config)
    payload = _payload(model, report, loaded, pruned, text, task_config, seqlen, max_windows)

    table = Table(title=f"{model}: pruned ({report.qk_criterion or '-'} Q-K, {report.vo_criterion or '-'} V-O, "
                  f"{report.allocation})")
    for col in ("layers", "Q-K dims per head", "V-O dims per head"):
        table.add_column(col, justify="right")
    for layers, (qk, vo) in _runs_of_equal_dims(report.layers):
        table.add_row(layers, qk, vo)
    console.print(table)
    _print_summary(report, payload)
    if pruned is not None:  # a streamed prune has saved itself, layer by layer
        save_model(pruned, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    if not streaming and loaded.source.library == "diffusers":
        console.print(f"saved to {out} (loads with clover.load_pruned_unet)")
    else:
        console.print(f"saved to {out} (loads with AutoModel*.from_pretrained after `import clover`, or with "
                      "trust_remote_code=True without clover)")
    if json_path:
        write_json(json_path, payload)


@app.command()
@_fails_cleanly
def latent(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the latent model in.")],
    kv_ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1); 0 converts "
                                                 "exactly.")] = 0.0,
    rope: Annotated[str, typer.Option(help="How keys meet RoPE: latent (pre-RoPE key latent, rebuilt when "
                                           "attending), shared (rotary components shared across KV heads per "
                                           "frequency, exact, nothing rebuilt) or mix (both).")] = "latent",
    allocation: Annotated[str, typer.Option(help="global: one budget over all layers; uniform: the same cached "
                                                 "dims in every layer.")] = "global",
    split: Annotated[str, typer.Option(help="Weight of key error against value error: auto (chosen on held-out "
                                            "calibration windows) or a positive number.")] = "auto",
    shared_fraction: Annotated[float, typer.Option(help="--rope mix: share of each layer's key dims held as "
                                                        "shared rotary components.")] = 0.25,
    k_dims: Annotated[Optional[int], typer.Option(help="Fixed key dims per layer (with --v-dims, instead of "
                                                       "--kv-ratio).")] = None,
    v_dims: Annotated[Optional[int], typer.Option(help="Fixed value dims per layer.")] = None,
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (the last 4 choose the split).")] = 16,
    calib_seqlen: CalibSeqlenOpt = 512,
    eval_ppl: EvalPplOpt = False,
    seqlen: SeqlenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    data: DataOpt = None,
    eval_tasks: EvalTasksOpt = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Share one key latent and one value latent across each layer's heads: a KV cache cut across heads."""
    from .latent import LatentConfig, to_latent
    from .latent.convert import check_model
    from .latent.families import family_for_type
    from .preflight import read_config
    from .save import save_model, write_json

    _check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    try:
        split_value: str | float = split if split == "auto" else float(split)
    except ValueError:
        raise CloverError(f"--split {split!r}: use auto or a positive number") from None
    config = LatentConfig(kv_ratio=kv_ratio, rope=rope, allocation=allocation, split=split_value,
                          shared_fraction=shared_fraction, k_dims=k_dims, v_dims=v_dims)
    config.check()
    seqlens = {"--calib-seqlen": calib_seqlen, **({"--seqlen": seqlen} if eval_ppl else {})}
    peeked = read_config(model)
    if peeked is not None:
        family_for_type(peeked.model_type)
        _check_model(peeked, model, seqlens, "latent conversion")
    task_config = _task_config(eval_tasks, task_limit, task_dir) if eval_tasks else None
    text = _test_text(eval_ppl, data)
    loaded = _load(model, dtype)
    check_model(loaded.model)
    _check_model(loaded.model, model, seqlens, "latent conversion")
    config.calibration = _calibration(loaded, calib, calib_samples, calib_seqlen)
    converted, report = to_latent(loaded.model, config)
    payload = _payload(model, report, loaded, converted, text, task_config, seqlen, max_windows)
    split_note = "" if report.split is None else f", key/value split {report.split:g}"
    table = Table(title=f"{model}: latent KV (--rope {report.rope}, {report.allocation}{split_note})")
    for col in ("layers", "key latent", "shared rotary components", "value latent", "cached dims / token"):
        table.add_column(col, justify="right")
    for layers, row in _runs_of_equal(report.layers, lambda lr: (
            str(lr.k_rank), str(lr.shared_components), str(lr.v_rank), f"{lr.cached_before} -> {lr.cached_after}")):
        table.add_row(layers, *row)
    console.print(table)
    _print_summary(report, payload)
    save_model(converted, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out} (loads with AutoModelForCausalLM.from_pretrained after `import clover`, or with "
                  "trust_remote_code=True without clover)")
    if json_path:
        write_json(json_path, payload)


@app.command(name="slice")
@_fails_cleanly
def slice_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the sliced model in.")],
    ratio: Annotated[float, typer.Option(help="Fraction of the hidden dimension removed, in [0, 1); 0 is the exact "
                                              "rotation alone.")] = 0.0,
    multiple_of: Annotated[int, typer.Option(help="Round the kept hidden width to a multiple of this (kernels "
                                                  "want 8; 1 keeps the exact count).")] = 8,
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    calib_seqlen: CalibSeqlenOpt = 512,
    eval_ppl: EvalPplOpt = False,
    seqlen: SeqlenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    data: DataOpt = None,
    eval_tasks: EvalTasksOpt = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Rotate the residual stream by its principal directions and delete the weakest (SliceGPT): every matrix that
    reads or writes the stream gets narrower."""
    from .preflight import read_config
    from .save import save_model, write_json
    from .slicing import SliceConfig, slice_
    from .slicing.families import check_config

    _check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = SliceConfig(ratio=ratio, multiple_of=multiple_of)
    config.check()
    seqlens = {"--calib-seqlen": calib_seqlen, **({"--seqlen": seqlen} if eval_ppl else {})}
    peeked = read_config(model)
    if peeked is not None:
        check_config(peeked)
        _check_model(peeked, model, seqlens, "slicing")
        _check_calibration_size(peeked, calib_samples, calib_seqlen)
    task_config = _task_config(eval_tasks, task_limit, task_dir) if eval_tasks else None
    text = _test_text(eval_ppl, data)
    loaded = _load(model, dtype)
    check_config(loaded.model.config)
    _check_model(loaded.model, model, seqlens, "slicing")
    _check_calibration_size(loaded.model.config, calib_samples, calib_seqlen)
    config.calibration = _calibration(loaded, calib, calib_samples, calib_seqlen)
    sliced, report = slice_(loaded.model, config)
    payload = _payload(model, report, loaded, sliced, text, task_config, seqlen, max_windows)
    table = Table(title=f"{model}: sliced ({report.runtime})")
    for col in ("hidden dims", "ratio applied", "stream energy kept", "rotation check (relative)"):
        table.add_column(col, justify="right")
    check = "-" if report.check is None else f"{report.check['relative_diff']:.1e} (tolerance " \
                                               f"{report.check['tolerance']:.0e})"
    table.add_row(f"{report.hidden_before} -> {report.hidden_after}", f"{report.ratio_applied:.4f}",
                  f"{report.energy_kept:.4f}", check)
    console.print(table)
    _print_summary(report, payload)
    save_model(sliced, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out} ({_loads_how(sliced)})")
    if json_path:
        write_json(json_path, payload)


def _loads_how(model) -> str:
    if model.config.model_type.startswith("clover_"):
        return ("loads with AutoModelForCausalLM.from_pretrained after `import clover`, or with "
                "trust_remote_code=True without clover")
    return "a stock transformers class: loads with AutoModelForCausalLM.from_pretrained"


def _check_calibration_size(config, samples: int, seqlen: int) -> None:
    """Slicing estimates a hidden x hidden covariance: fewer calibration tokens than hidden dims leave it singular."""
    hidden = getattr(config, "hidden_size", None)
    if hidden and 0 < samples * seqlen < hidden:
        raise CloverError(f"--calib-samples {samples} x --calib-seqlen {seqlen} = {samples * seqlen} tokens is fewer "
                          f"than the hidden size {hidden}: the stream's covariance would be singular; raise either")


def _runs_of_equal(layers, cells) -> list[tuple[str, tuple]]:
    """Consecutive layers whose ``cells(layer)`` agree collapse into one row ("0-29")."""
    rows: list[tuple[list[int], tuple]] = []
    for lr in layers:
        row = cells(lr)
        if rows and rows[-1][1] == row and rows[-1][0][-1] == lr.layer - 1:
            rows[-1][0].append(lr.layer)
        else:
            rows.append(([lr.layer], row))
    return [(f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]), row) for ids, row in rows]


STACK_AMOUNTS = {"qk-ratio": "qk_ratio", "vo-ratio": "vo_ratio", "qk-threshold": "qk_threshold",
                 "vo-threshold": "vo_threshold"}


def _parse_stacks(values: list[str]) -> dict:
    """``["encoder:vo-ratio=0.5,qk-ratio=0.25", "cross:vo-threshold=0.01"]`` -> ``{name: StackPlan}``."""
    from .prune import StackPlan

    plans = {}
    for value in values:
        name, _, amounts = value.partition(":")
        name = name.strip()
        if not name or not amounts.strip():
            raise CloverError(f"--stack {value!r}: write NAME:AMOUNT=VALUE, e.g. --stack encoder:vo-ratio=0.5")
        if name in plans:
            raise CloverError(f"--stack {name} given twice: put all its amounts in one --stack, comma-separated")
        settings = {}
        for item in amounts.split(","):
            key, _, number = item.partition("=")
            key = key.strip()
            if key not in STACK_AMOUNTS:
                raise CloverError(f"--stack {value!r}: unknown amount {key!r}; use {', '.join(STACK_AMOUNTS)}")
            try:
                settings[STACK_AMOUNTS[key]] = float(number)
            except ValueError:
                raise CloverError(f"--stack {value!r}: {number.strip()!r} is not a number") from None
        plans[name] = StackPlan(**settings)
    return plans


def _parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            ratios.append(float(part))
        except ValueError:
            raise CloverError(f"--ratios {text!r}: {part!r} is not a number; pass fractions such as 0.125,0.25,0.5") \
                from None
    if not ratios:
        raise CloverError("--ratios is empty: pass fractions such as 0.125,0.25,0.5")
    return ratios


@app.command()
@_fails_cleanly
def sweep(
    model: ModelArg,
    pair: Annotated[str, typer.Option(help="Which pair to prune: qk, vo or both.")] = "vo",
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios of head dims removed.")] = "0.125,0.25,0.5",
    criteria: Annotated[str, typer.Option(help="Comma-separated criteria to compare.")] = "vanilla,clover,whitened",
    qk_criterion: Annotated[Optional[str], typer.Option(help="Q-K criterion when --pair both on a rotary model.")]
    = None,
    allocation: Annotated[str, typer.Option(help="uniform or global.")] = "uniform",
    calib: Annotated[Optional[Path], typer.Option(help="Calibration corpus folder.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seqlen: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Perplexity on the first N windows only.")] = 40,
    data: Annotated[Optional[Path], typer.Option(help="Evaluation corpus folder.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of perplexity against ratio per criterion.")] = None,
    eval_tasks: Annotated[Optional[str], typer.Option(help="Also score lm-eval task accuracy (comma-separated "
                                                           "task names) for the base and every prune.")] = None,
    task_limit: TaskLimitOpt = None,
    task_dir: TaskDirOpt = None,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Perplexity against pruning ratio for each criterion (the picture that says which criterion to trust)."""
    from .data import load_text
    from .save import write_json
    from .preflight import read_config
    from .ranks import check_ratio
    from .sweep import plot_sweep, run_sweep

    _check_outputs(model, json_path=json_path, plot=plot)
    if pair not in ("qk", "vo", "both"):
        raise CloverError(f"unknown --pair {pair!r}: use qk, vo or both")
    _refuse_perplexity(model, "clover sweep (perplexity against ratio)")
    ratio_list = _parse_ratios(ratios)
    for ratio in ratio_list:
        check_ratio(ratio, "--ratios entry")
        if ratio == 0:
            raise CloverError("--ratios entry 0 prunes nothing (the base model is always measured): drop it")
    criteria_list = [c.strip() for c in criteria.split(",") if c.strip()]
    if not criteria_list:
        raise CloverError("--criteria is empty: pass some of vanilla, clover, whitened")
    calibrates = _needs_calibration(*criteria_list, qk_criterion)
    seqlens = {"--seqlen": seqlen, **({"--calib-seqlen": calib_seqlen} if calibrates else {})}
    what = "clover sweep (next-token perplexity)"
    _check_model(read_config(model), model, seqlens, what)
    task_config = _task_config(eval_tasks, task_limit, task_dir) if eval_tasks else None
    text = load_text(corpus="wikitext2", split="test", data=data)
    loaded = _load(model, dtype)
    _check_model(loaded.model, model, seqlens, what)
    calibration = None
    if calibrates:
        calibration = _calibration(loaded, calib, calib_samples, calib_seqlen)
    result = run_sweep(loaded.model, loaded.tokenizer, text, pair=pair, ratios=ratio_list, criteria=criteria_list,
                       qk_criterion=qk_criterion, allocation=allocation, calibration=calibration, seqlen=seqlen,
                       max_windows=max_windows, tasks=task_config)
    base_acc = f", average task accuracy {result['base_tasks']['average']:.4f}" if task_config else ""
    table = Table(title=f"{model}: WikiText-2 test ppl{' / task accuracy' if task_config else ''}, {pair} pruned "
                        f"(base {result['base_ppl']:.3f}{base_acc})")
    table.add_column("ratio", justify="right")
    for c in criteria_list:
        table.add_column(c, justify="right")
    for ratio in ratio_list:
        cells = []
        for c in criteria_list:
            cell = f"{result['ppl'][c][str(ratio)]:.3f}"
            if task_config:
                cell += f" / {result['tasks'][c][str(ratio)]['average']:.4f}"
            cells.append(cell)
        table.add_row(f"{ratio:g}", *cells)
    console.print(table)
    if plot:
        plot_sweep(result, str(plot), title=f"{model}: {pair} pruning")
        console.print(f"plot written to {plot}")
    if json_path:
        write_json(json_path, {"model": model, **result})


@app.command()
@_fails_cleanly
def finetune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for the merged model (written atomically).")],
    data: Annotated[Optional[Path], typer.Option(help="Training text: .txt, .jsonl (a 'text' field per line) or "
                                                     ".parquet (a 'text' column).")] = None,
    method: Annotated[str, typer.Option(help="clover, lora, pissa, dora (peft) or full.")] = "clover",
    targets: Annotated[Optional[str], typer.Option(help="CLOVER targets (and the modules LoRA adapts): some of qk, "
                                                        "k, vo, up. Default: qk (k on rotary models), vo, up.")] = None,
    match_params_of: Annotated[Optional[str], typer.Option(help="lora:r=N: pick the CLOVER targets whose trainable "
                                                               "count is closest to LoRA r=N on the same modules.")]
    = None,
    lora_r: Annotated[int, typer.Option(help="Rank for lora / pissa / dora.")] = 8,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Windows per device per step.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    seqlen: Annotated[int, typer.Option(help="Tokens per training window.")] = 256,
    dropout: Annotated[float, typer.Option(help="Dropout on the update path (LoRA's lora_dropout).")] = 0.0,
    train_bias: Annotated[bool, typer.Option(help="Also train the biases of the targeted projections "
                                                  "(CLOVER-dagger).")] = False,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    checkpoints: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: OUT.checkpoints).")]
    = None,
    resume: Annotated[bool, typer.Option(help="Resume from the last complete checkpoint if there is one.")] = True,
    init_only: Annotated[bool, typer.Option(help="Only decompose (CLOVER) and save the attached model to --out, "
                                                 "for every rank of a distributed run to load.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (data order, dropout).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Fine-tune with CLOVER (or LoRA / PiSSA / DoRA / full) on the Hugging Face Trainer, merge, save.

    Runs unchanged under `accelerate launch` (DDP, FSDP: see configs/accelerate/)."""
    import os

    from .finetune import attach, is_decomposed_dir, load_decomposed, save_decomposed
    from .finetune.attach import TuneConfig
    from .finetune.data import load_texts, token_windows
    from .finetune.targets import parse_match
    from .finetune.train import FinetuneConfig, data_fingerprint, train
    from .preflight import read_config
    from .save import save_model, write_json

    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun, rank 0 writes
    _check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    # --overwrite replaces the output and starts the run afresh: old checkpoints are another run's.
    config = FinetuneConfig(method=method, targets=targets, lora_r=lora_r, steps=steps, lr=lr, batch_size=batch_size,
                            grad_accum=grad_accum, seqlen=seqlen, dropout=dropout, train_bias=train_bias,
                            save_steps=save_steps, seed=seed, resume=resume and not overwrite,
                            match_lora_r=parse_match(match_params_of) if match_params_of else None)
    config.check()
    if checkpoints is not None:
        from .preflight import check_out_dir

        check_out_dir(checkpoints, True, model, flag="--checkpoints")
    decomposed = is_decomposed_dir(model)
    if init_only:
        if method != "clover":
            raise CloverError("--init-only decomposes for CLOVER: use it with --method clover")
        loaded = _load(model, dtype)
        report = attach(loaded.model, TuneConfig(targets=targets, dropout=dropout, train_bias=train_bias))
        if main_process:
            save_decomposed(loaded.model, loaded.tokenizer, out, overwrite=overwrite)
        console.print(f"CLOVER targets {list(report.targets)}: {report.trainable_parameters:,} trainable parameters; "
                      f"decomposed model saved to {out} (pass it as MODEL to every rank)")
        return
    if data is None:
        raise CloverError("no training data: pass --data PATH (.txt, .jsonl or .parquet)")
    texts = load_texts(data)
    what = "clover finetune (causal-LM training)"
    _check_model(None if decomposed else read_config(model), model, {"--seqlen": seqlen}, what)
    config.data = data_fingerprint(data)
    if decomposed:
        if method != "clover":
            raise CloverError(f"{model} is a decomposed CLOVER checkpoint: train it with --method clover, "
                              "or start LoRA / PiSSA / DoRA from the original model")
        net, tokenizer, _ = load_decomposed(model, dtype=_torch_dtype(dtype), dropout=dropout)
    else:
        loaded = _load(model, dtype)
        net, tokenizer = loaded.model, loaded.tokenizer
    _check_model(net, model, {"--seqlen": seqlen}, what)
    dataset = token_windows(tokenizer, texts, seqlen)
    run_dir = checkpoints or out.parent / f"{out.name}.checkpoints"
    final, result = train(net, tokenizer, dataset, config, run_dir, model_name=str(model),
                          log=lambda line: console.print(line, highlight=False) if main_process else None)
    payload = {"model": str(model), "data": str(data), "config": {k: v for k, v in vars(config).items()},
               **result.to_dict()}
    if result.rank == 0:
        save_model(final, tokenizer, out, overwrite=overwrite, report=payload)
        table = Table(title=f"{model}: fine-tuned with {result.method}")
        for col in ("trainable parameters", "steps", "train loss", "wall s", "processes", "merged weights sha256"):
            table.add_column(col, justify="right")
        loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"
        table.add_row(f"{result.trainable:,}", str(result.steps), loss, f"{result.wall_s:.1f}",
                      f"{result.world_size} ({result.engine})", result.digest[:16])
        console.print(table)
        console.print(f"merged model saved to {out} (checkpoints in {run_dir})")
        if json_path:
            write_json(json_path, payload)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
