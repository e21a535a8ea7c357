"""``clover finetune``: CLOVER (or a peft baseline) on the Hugging Face Trainer, merged and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (AdamEpsOpt, CoreScaleOpt, DtypeOpt, JsonOpt, LrScaleOpt, ModelArg, check_model_fits,
                     check_outputs, console, load, torch_dtype)


def finetune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for the merged model (written atomically).")],
    data: Annotated[Optional[Path], typer.Option(help="Training text: .txt, .jsonl (a 'text' field per line) or "
                                                     ".parquet (a 'text' column).")] = None,
    method: Annotated[str, typer.Option(help="clover, lora, pissa, dora (peft) or full.")] = "clover",
    targets: Annotated[Optional[str], typer.Option(help="CLOVER targets (and the modules LoRA adapts): some of qk, "
                                                        "k, vo, up, rope (MLA: the rotated query rows). Default: qk "
                                                        "(k on rotary models), vo, up.")] = None,
    match_params_of: Annotated[Optional[str], typer.Option(help="lora:r=N: pick the CLOVER targets whose trainable "
                                                               "count is closest to LoRA r=N on the same modules.")]
    = None,
    lora_r: Annotated[int, typer.Option(help="Rank for lora / pissa / dora.")] = 8,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    lr_scale: LrScaleOpt = None,
    adam_eps: AdamEpsOpt = None,
    core_scale: CoreScaleOpt = "unit",
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
    keep_checkpoints: Annotated[bool, typer.Option(
        "--keep-checkpoints/--drop-checkpoints", help="Keep the checkpoint folder once the merged model is saved (its "
        "size is reported); --drop-checkpoints deletes it.")] = True,
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

    from ..finetune import attach, is_decomposed_dir, load_decomposed, save_decomposed
    from ..finetune.attach import TuneConfig
    from ..finetune.data import load_texts, token_windows
    from ..finetune.targets import parse_match
    from ..finetune.train import FinetuneConfig, data_fingerprint, train
    from ..preflight import read_config
    from ..save import save_model, write_json

    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun, rank 0 writes
    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    # --overwrite replaces the output and starts the run afresh: old checkpoints are another run's.
    config = FinetuneConfig(method=method, targets=targets, lora_r=lora_r, steps=steps, lr=lr, lr_scales=lr_scale or (),
                            adam_eps=adam_eps, core_scale=core_scale, batch_size=batch_size,
                            grad_accum=grad_accum, seqlen=seqlen, dropout=dropout, train_bias=train_bias,
                            save_steps=save_steps, seed=seed, resume=resume and not overwrite,
                            match_lora_r=parse_match(match_params_of) if match_params_of else None)
    config.check()
    if checkpoints is not None:
        from ..preflight import check_out_dir

        check_out_dir(checkpoints, True, model, flag="--checkpoints")
    decomposed = is_decomposed_dir(model)
    if init_only:
        if method != "clover":
            raise CloverError("--init-only decomposes for CLOVER: use it with --method clover")
        loaded = load(model, dtype)
        report = attach(loaded.model, TuneConfig(targets=targets, dropout=dropout, train_bias=train_bias,
                                                 core_scale=core_scale))
        if main_process:
            save_decomposed(loaded.model, loaded.tokenizer, out, overwrite=overwrite)
        console.print(f"CLOVER targets {list(report.targets)}: {report.trainable_parameters:,} trainable parameters; "
                      f"decomposed model saved to {out} (pass it as MODEL to every rank)")
        return
    if data is None:
        raise CloverError("no training data: pass --data PATH (.txt, .jsonl or .parquet)")
    texts = load_texts(data)
    what = "clover finetune (causal-LM training)"
    check_model_fits(None if decomposed else read_config(model), model, {"--seqlen": seqlen}, what)
    config.data = data_fingerprint(data)
    if decomposed:
        if method != "clover":
            raise CloverError(f"{model} is a decomposed CLOVER checkpoint: train it with --method clover, "
                              "or start LoRA / PiSSA / DoRA from the original model")
        net, tokenizer, _ = load_decomposed(model, dtype=torch_dtype(dtype), dropout=dropout)
    else:
        loaded = load(model, dtype)
        net, tokenizer = loaded.model, loaded.tokenizer
    check_model_fits(net, model, {"--seqlen": seqlen}, what)
    dataset = token_windows(tokenizer, texts, seqlen)
    run_dir = checkpoints or out.parent / f"{out.name}.checkpoints"
    final, result = train(net, tokenizer, dataset, config, run_dir, model_name=str(model),
                          log=lambda line: console.print(line, highlight=False) if main_process else None)
    payload = {"model": str(model), "data": str(data), "config": {k: v for k, v in vars(config).items()},
               **result.to_dict()}
    if result.rank == 0:
        save_model(final, tokenizer, out, overwrite=overwrite, report=payload)
        table = Table(title=f"{model}: fine-tuned with {result.method}")
        for col in ("trainable parameters", "steps", "train loss", "late loss (held out)", "wall s", "processes",
                    "merged weights sha256"):
            table.add_column(col, justify="right")
        loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"
        late = "-" if result.heldout_loss is None else f"{result.heldout_loss:.4f}"
        table.add_row(f"{result.trainable:,}", str(result.steps), loss, late, f"{result.wall_s:.1f}",
                      f"{result.world_size} ({result.engine})", result.digest[:16])
        console.print(table)
        console.print(f"merged model saved to {out}")
        console.print(_checkpoints_line(run_dir, keep_checkpoints))
        if json_path:
            write_json(json_path, payload)


def _checkpoints_line(run_dir: Path, keep: bool) -> str:
    """Say what the checkpoints cost on disk, and drop them when asked (the merged model no longer needs them)."""
    import shutil

    size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) if run_dir.is_dir() else 0
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"checkpoints deleted ({size / 2**30:.2f} GiB freed in {run_dir})"
    return (f"checkpoints kept in {run_dir} ({size / 2**30:.2f} GiB; they let an interrupted run resume): delete the "
            "folder, or pass --drop-checkpoints next time")
