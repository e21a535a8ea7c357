"""``clover heal``: tune a ``clover mla`` output toward the model it came from (KL distillation), merge, save."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (AdamEpsOpt, CoreScaleOpt, DtypeOpt, JsonOpt, LrScaleOpt, MaxWindowsOpt, ModelArg,
                     check_model_fits, check_outputs, comma_list, console, load)


def heal(
    model: ModelArg,
    teacher: Annotated[str, typer.Option(help="The model the conversion was made from (registry name or folder): "
                                              "its next-token distribution is the target.")],
    out: Annotated[Path, typer.Option(help="Directory for the healed model (a stock DeepSeek-V3, written "
                                           "atomically).")],
    method: Annotated[str, typer.Option(help="clover (per-head singular-value cores), lora or pissa (peft).")]
    = "clover",
    targets: Annotated[str, typer.Option(help="What to train, in CLOVER's names (LoRA / PiSSA adapt the same "
                                              "modules): some of qk, vo, up, rope (each head's rotated query "
                                              "rows).")] = "qk,vo,up",
    lora_r: Annotated[Optional[int], typer.Option(help="Rank for lora / pissa (default: the rank whose trainable "
                                                       "count matches CLOVER's on the same modules).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training text: .txt, .jsonl or .parquet (default: the "
                                                     "WikiText-2 validation split, the calibration text).")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="WikiText-2 folder (else $CLOVER_DATA): validation trains "
                                                       "without --data, test scores --eval-ppl.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 40,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear decay).")] = 1e-3,
    lr_scale: LrScaleOpt = None,
    adam_eps: AdamEpsOpt = None,
    core_scale: CoreScaleOpt = "unit",
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear warmup to the peak learning rate.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 2,
    seqlen: Annotated[int, typer.Option(help="Tokens per training window.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed (data order; LoRA's initialisation).")] = 0,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 20,
    checkpoints: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: OUT.checkpoints).")]
    = None,
    resume: Annotated[bool, typer.Option(help="Resume from the last complete checkpoint of the same run.")] = True,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints/--drop-checkpoints",
                                                   help="Keep the checkpoint folder once the model is saved.")] = True,
    eval_ppl: Annotated[bool, typer.Option(help="WikiText-2 test perplexity of the teacher, the conversion and the "
                                                "healed model.")] = False,
    eval_seqlen: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    max_windows: MaxWindowsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists (and start the run afresh).")] = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Heal an MLA conversion: CLOVER (or LoRA / PiSSA) trained so its next-token distribution matches the original
    model's on calibration text (no labels), merged back into the same stock DeepSeek-V3 layout."""
    from ..data import load_rows, load_text
    from ..evaluate import perplexity
    from ..finetune.data import load_texts, token_windows
    from ..finetune.train import data_fingerprint, weights_digest
    from ..heal import HealConfig
    from ..heal import heal as heal_model
    from ..heal.run import check_pair, check_student
    from ..preflight import check_out_dir, read_config
    from ..save import save_model, write_json
    from .finetune import _checkpoints_line

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    config = HealConfig(method=method, targets=comma_list(targets),
                        lora_r=lora_r, steps=steps, lr=lr, lr_scales=lr_scale or (), warmup_steps=warmup_steps,
                        adam_eps=adam_eps, core_scale=core_scale, batch_size=batch_size,
                        seqlen=seqlen, seed=seed,
                        save_steps=save_steps, resume=resume and not overwrite)
    config.check()
    if checkpoints is not None:
        check_out_dir(checkpoints, True, model, flag="--checkpoints")
    student_config, teacher_config = read_config(model), read_config(teacher)
    if student_config is not None:
        check_student(student_config, str(model))
        check_model_fits(student_config, model, {"--seqlen": seqlen}, "clover heal")
    if student_config is not None and teacher_config is not None:
        check_pair(student_config, teacher_config, str(model), str(teacher))
    if data is not None:
        texts, data_name = load_texts(data), data_fingerprint(data)
    else:
        texts = ["\n\n".join(load_rows(split="validation", data=corpus, flag="--corpus"))]
        data_name = f"wikitext2 validation sha256:{_sha256(texts[0])}"
    test = load_text(split="test", data=corpus) if eval_ppl else None

    student = load(model, dtype)
    original = load(teacher, dtype)
    check_pair(student.model.config, original.model.config, str(model), str(teacher))
    check_model_fits(student.model, model, {"--seqlen": seqlen}, "clover heal")
    windows = token_windows(student.tokenizer, texts, seqlen)

    def ppl(net) -> float:
        return perplexity(net, student.tokenizer, test, seqlen=eval_seqlen, max_windows=max_windows).ppl

    before = {"teacher": ppl(original.model), "converted": ppl(student.model)} if eval_ppl else {}
    run_dir = checkpoints or out.parent / f"{out.name}.checkpoints"
    teacher_name = f"{teacher} sha256:{weights_digest(original.model)}"
    healed, report = heal_model(student.model, original.model, student.tokenizer, windows, config, run_dir,
                                student_name=str(model), teacher_name=teacher_name, data_name=data_name,
                                log=lambda line: console.print(line, highlight=False))
    after = {"healed": ppl(healed)} if eval_ppl else {}
    payload = {"model": str(model), "teacher": str(teacher), "data": str(data) if data else "wikitext2 validation",
               "config": {k: v for k, v in vars(config).items()}, **report.to_dict(),
               **({"ppl": {**before, **after}, "eval_seqlen": eval_seqlen, "max_windows": max_windows}
                  if eval_ppl else {})}
    save_model(healed, student.tokenizer, out, overwrite=overwrite, report=payload)

    table = Table(title=f"{model}: healed with {report.method} toward {teacher}")
    columns = ["trainable", "CLOVER budget", "LoRA rank", "steps", "mean KL", "late KL (held out)",
               "unchanged tensors", "wall s"]
    row = [f"{report.trainable:,}", f"{report.clover_budget:,}", "-" if report.lora_r is None else str(report.lora_r),
           str(report.steps), "-" if report.train_kl is None else f"{report.train_kl:.4f}",
           "-" if report.heldout_kl is None else f"{report.heldout_kl:.4f}", str(report.unchanged),
           f"{report.wall_s:.1f}"]
    if eval_ppl:
        columns += ["ppl teacher", "ppl converted", "ppl healed"]
        row += [f"{before['teacher']:.2f}", f"{before['converted']:.2f}", f"{after['healed']:.2f}"]
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*row)
    console.print(table)
    console.print(f"healed model saved to {out} (a stock DeepSeek-V3: clover export {out} --gguf F.gguf)")
    console.print(_checkpoints_line(run_dir, keep_checkpoints))
    if json_path:
        write_json(json_path, payload)


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
