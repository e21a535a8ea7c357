"""``clover prune``: remove the weakest head directions (per stack, per pair, by ratio or threshold)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (CalibOpt, CriterionOpt, DataOpt, DtypeOpt, EvalPplOpt, EvalTasksOpt, JsonOpt, MaxWindowsOpt,
                     ModelArg, OverwriteOpt, SeqlenOpt, StreamOpt, TaskDirOpt, TaskLimitOpt, calibration_rows,
                     calibration_windows, check_model_fits, check_outputs, console, default_calib_seqlen, load,
                     needs_calibration, refuse_perplexity, streams, tokenizer_only, torch_dtype)
from .report import before_after, print_summary, stack_name, tasks_from_cli, test_text


def _runs_of_equal_dims(layers) -> list[tuple[str, tuple[str, str]]]:
    """Consecutive layers with the same dims collapse into one row ("0-29"), so uniform prunes stay short; models
    with several attention stacks (Mllama) get the stack in front of the layer numbers."""
    rows: list[tuple[str, list[int], tuple[str, str]]] = []
    for lr in layers:
        dims = (f"{lr.qk_before} -> {lr.qk_dim}", f"{lr.vo_before} -> {lr.vo_dim}")
        if rows and rows[-1][2] == dims and rows[-1][0] == stack_name(lr) and rows[-1][1][-1] == lr.layer - 1:
            rows[-1][1].append(lr.layer)
        else:
            rows.append((stack_name(lr), [lr.layer], dims))
    several = len({stack for stack, _, _ in rows}) > 1
    return [((f"{stack} " if several else "") + (f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])), dims)
            for stack, ids, dims in rows]


def prune(
    ctx: typer.Context,
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
    vo_whitening: Annotated[str, typer.Option(help="whitened V-O: auto (the one of mixed + O refit, mixed and input "
                                                   "that stays closest to the original on the last 4 calibration "
                                                   "windows), mixed (attention-mixed values, O refit) or input "
                                                   "(layer inputs).")] = "auto",
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
    from .. import modeling
    from ..preflight import read_config
    from ..prune import PruneConfig, check_runtime, prune as run_prune
    from ..save import save_model, write_json

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = PruneConfig(qk_ratio=qk_ratio, vo_ratio=vo_ratio, criterion=criterion, qk_criterion=qk_criterion,
                         qk_threshold=qk_threshold, vo_threshold=vo_threshold, allocation=allocation,
                         vo_whitening=vo_whitening, sequential=sequential,
                         stacks=_parse_stacks(stack) if stack else None)
    config.check()
    if calib_features is not None and calib_audio is not None:
        raise CloverError("--calib-features and --calib-audio both given: pass one source of encoder calibration")
    calibrates = needs_calibration(config.pair_criterion("qk") if config.active("qk") else None,
                                   config.pair_criterion("vo") if config.active("vo") else None)
    if eval_ppl:
        refuse_perplexity(model, "--eval-ppl")
    streaming = streams(model, stream)
    if streaming and (eval_ppl or eval_tasks):
        flag = "--eval-ppl" if eval_ppl else "--eval-tasks"
        raise CloverError(f"{flag} needs the whole model in memory: run `clover eval` on the streamed output, "
                          "or pass --no-stream")
    causal_for = "--eval-ppl (next-token perplexity)" if eval_ppl else None
    if eval_tasks:
        refuse_perplexity(model, "--eval-tasks")
        causal_for = causal_for or "--eval-tasks (multiple-choice log-likelihoods)"
    task_config = tasks_from_cli(eval_tasks, task_limit, task_dir) if eval_tasks else None
    peeked = read_config(model)
    calib_seqlen, calib_note = default_calib_seqlen(ctx, peeked, calib_seqlen)

    def lengths() -> dict[str, int]:
        return {**({"--calib-seqlen": calib_seqlen} if calibrates else {}),
                **({"--seqlen": seqlen} if eval_ppl else {})}

    if peeked is not None:  # the head, the lengths and the ratios, from config.json alone
        modeling.check_prunable(peeked)
        check_model_fits(peeked, model, lengths(), causal_for)
        config.check_against(peeked)
    text = test_text(eval_ppl, data)
    if calibrates:
        calibration_rows(model, calib)
    loaded = tokenizer_only(model) if streaming else load(model, dtype)
    if not streaming:
        check_runtime(loaded.model)
        # A UNet's --calib-seqlen counts text-embedding tokens, not positions of a context.
        text_model = loaded.source.library == "transformers"
        if text_model and peeked is None:
            calib_seqlen, calib_note = default_calib_seqlen(ctx, loaded.model, calib_seqlen)
        check_model_fits(loaded.model, model, lengths() if text_model else {}, causal_for)
    audio, audio_rows, notes = None, None, []
    if calib_audio is not None:
        from ..adapters.whisper import require_whisper
        from ..audio import read_calibration_audio

        require_whisper(getattr(loaded, "model", None), "--calib-audio")
        audio = read_calibration_audio(calib_audio, model, loaded.model.config)
        if calibrates and calib_samples < len(audio.files):  # fewer windows than clips would leave clips unheard
            notes.append(f"--calib-samples {calib_samples} raised to {len(audio.files)}, the number of --calib-audio "
                         "clips, so that every clip is heard")
            calib_samples = len(audio.files)
    if calibrates:
        config.calibration = calibration_windows(loaded, calib, calib_samples, calib_seqlen)
    if calib_features is not None:
        from ..adapters.whisper import load_calibration_features

        load_calibration_features(loaded.model, calib_features)
    if audio is not None:
        from ..adapters.whisper import set_calibration_features

        uses = set_calibration_features(loaded.model, audio.features, windows=config.calibration)
        if uses is not None:
            note, audio_rows = audio.summary(uses)
            notes.append(note)
    if streaming:
        from ..streaming import StreamOptions, stream_prune

        report = stream_prune(model, out, config, StreamOptions(dtype=torch_dtype(dtype), overwrite=overwrite))
        pruned = None
    else:
        pruned, report = run_prune(loaded.model, config)
    report.notes.extend(n for n in (calib_note, *notes) if n)
    payload = before_after(model, report, loaded, pruned, text, task_config, seqlen, max_windows)
    if audio_rows is not None:
        payload["calibration_audio"] = audio_rows

    whitening = "" if report.vo_whitening is None else f" ({report.vo_whitening}" + (
        ", chosen on held-out windows)" if report.vo_whitening_losses else ")")
    table = Table(title=f"{model}: pruned ({report.qk_criterion or '-'} Q-K, {report.vo_criterion or '-'} V-O"
                  f"{whitening}, {report.allocation})")
    for col in ("layers", "Q-K dims per head", "V-O dims per head"):
        table.add_column(col, justify="right")
    for layers, (qk, vo) in _runs_of_equal_dims(report.layers):
        table.add_row(layers, qk, vo)
    console.print(table)
    print_summary(report, payload)
    if pruned is not None:  # a streamed prune has saved itself, layer by layer
        save_model(pruned, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    if not streaming and loaded.source.library == "diffusers":
        console.print(f"saved to {out} (loads with clover.load_pruned_unet)")
    else:
        console.print(f"saved to {out} (loads with AutoModel*.from_pretrained after `import clover`, or with "
                      "trust_remote_code=True without clover)")
    if json_path:
        write_json(json_path, payload)


STACK_AMOUNTS = {"qk-ratio": "qk_ratio", "vo-ratio": "vo_ratio", "qk-threshold": "qk_threshold",
                 "vo-threshold": "vo_threshold"}


def _parse_stacks(values: list[str]) -> dict:
    """``["encoder:vo-ratio=0.5,qk-ratio=0.25", "cross:vo-threshold=0.01"]`` -> ``{name: StackPlan}``."""
    from ..prune import StackPlan

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
