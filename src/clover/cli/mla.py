"""``clover mla``: a LLaMA-family model -> a stock DeepSeek-V3 (MLA) checkpoint with a latent-only KV cache."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import (CalibOpt, CalibSeqlenOpt, DataOpt, DtypeOpt, EvalPplOpt, JsonOpt, MaxWindowsOpt, ModelArg,
                     OverwriteOpt, SeqlenOpt, check_outputs, comma_list, console)
from .prepare import load_calibrated, peek
from .report import before_after, print_summary


def check_cell(check: dict) -> str:
    """The verification in one cell: the float32 figure, and where float32 rounding alone passed it, the float64 one."""
    cell = f"{check['relative_diff']:.1e} (tolerance {check['tolerance']:.0e})"
    exact = check.get("float64_reference")
    if exact:
        cell += (f"; vs float64: {exact['stock_relative_diff']:.1e}, clover's float32 reference "
                 f"{exact['float32_reference_relative_diff']:.1e}")
    return cell


def mla(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to save the DeepSeek-V3 checkpoint in.")],
    kv_ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1); 0 keeps every latent "
                                                 "dim (the only error left is the rotation the format cannot "
                                                 "hold).")] = 0.0,
    split: Annotated[str, typer.Option(help="Weight of key error against value error in the joint latent: auto "
                                            "(one for every layer, chosen on held-out calibration windows), layer "
                                            "(then each layer its own, chosen the same way) or a positive number.")]
    = "auto",
    preset: Annotated[Optional[str], typer.Option(help="vllm: refuse a kv_lora_rank vLLM's MLA kernels cannot run "
                                                       "(kv_lora_rank + rope dims must be 320 or 576).")] = None,
    layout: Annotated[str, typer.Option(help="mla: DeepSeek-V3 with a latent-only cache; gqa: the plain llama "
                                             "architecture with --kv-heads KV heads (every engine runs it).")]
    = "mla",
    kv_heads: Annotated[int, typer.Option(help="--layout gqa: KV heads of the output (dividing the model's).")] = 1,
    rope_key: Annotated[str, typer.Option(help="Which component of each frequency is the shared rotated key: pca "
                                               "(the keys' own, TransMLA), query (weighted by the queries reading "
                                               "each KV head), attention (also by the attention keys receive).")]
    = "query",
    unrotated: Annotated[str, typer.Option(help="What the key components without a rotated place keep: nope (no "
                                                "rotation), expected (the rotation's mean under the original "
                                                "attention), refit (least squares to the original scores).")]
    = "refit",
    rope_dims: Annotated[Optional[int], typer.Option(help="Rotated dims of the shared key (even, default all): fewer "
                                                          "leave more of the cache to the latent.")] = None,
    rope_frequencies: Annotated[str, typer.Option(help="With --rope-dims below the head width, which frequencies "
                                                       "stay rotated: fastest (theta rescaled so the engine computes "
                                                       "them exactly) or spread (every (head_dim / rope_dims)-th, "
                                                       "the same theta).")] = "fastest",
    latent_weights: Annotated[str, typer.Option(help="clover (query- and O-weighted joint latent) or bkv "
                                                     "(TransMLA's balanced plain PCA).")] = "clover",
    freqfold: Annotated[int, typer.Option(help="TransMLA's FreqFold: this many neighbouring frequencies share one "
                                               "PCA (1: none; with --unrotated nope).")] = 1,
    o_refit: Annotated[bool, typer.Option(help="Refit each head's O block to the latent's values on "
                                               "attention-mixed calibration inputs.")] = True,
    value_moment: Annotated[str, typer.Option(help="What prices value errors in the joint latent: input (the "
                                                   "attention input) or mixed (the attention-mixed inputs O "
                                                   "reads; keys stay priced by the input).")] = "input",
    local_steps: Annotated[int, typer.Option(help="Layer-wise refit: Adam steps per attention block toward the "
                                                  "original block's output on the calibration windows, kept where "
                                                  "the held-out windows improve (0: off).")] = 0,
    local_lr: Annotated[float, typer.Option(help="Layer-wise refit's lr, relative to each tensor's RMS.")] = 3e-4,
    local_inputs: Annotated[str, typer.Option(help="What each refit block reads: original (the original model's "
                                                   "attention inputs), converted (the converted model's, first "
                                                   "to last) or residual (converted, and each block also makes up "
                                                   "the residual stream's error at its input).")] = "original",
    stream_refit: Annotated[str, typer.Option(help="Projections that write into the residual stream to refit in "
                                                   "closed form toward the original stream, on the converted "
                                                   "model's, each kept where the held-out windows improve: o "
                                                   "(attention output), down (MLP), or o,down (empty: off).")] = "",
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (the last 4 choose the split and check "
                                                    "the refits).")] = 16,
    calib_seqlen: CalibSeqlenOpt = 512,
    eval_ppl: EvalPplOpt = False,
    seqlen: SeqlenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    data: DataOpt = None,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = None,
):
    """Convert attention to MLA (one shared rotated key, one joint key/value latent per layer) and save a stock
    DeepseekV3ForCausalLM that transformers and llama.cpp (clover export --gguf) run without clover; or, with
    --layout gqa, a stock model of the same family with fewer KV heads."""
    from ..mla import MlaConfig, to_mla
    from ..mla.config import SPLIT_SEARCHES
    from ..mla.convert import check_model
    from ..save import save_model, write_json

    check_outputs(model, out=out, overwrite=overwrite, json_path=json_path)
    try:
        split_value: str | float = split if split in SPLIT_SEARCHES else float(split)
    except ValueError:
        raise CloverError(f"--split {split!r}: use auto, layer or a positive number") from None
    config = MlaConfig(kv_ratio=kv_ratio, split=split_value, preset=preset, layout=layout, kv_heads=kv_heads,
                       rope_key=rope_key, unrotated=unrotated, rope_dims=rope_dims,
                       rope_frequencies=rope_frequencies, latent_weights=latent_weights, freqfold=freqfold,
                       o_refit=o_refit, value_moment=value_moment, local_steps=local_steps, local_lr=local_lr,
                       local_inputs=local_inputs,
                       stream_refit=comma_list(stream_refit))
    config.check()
    peeked = peek(ctx, model, "MLA conversion", calib_seqlen, eval_ppl, seqlen, lambda c, _: config.check_against(c))
    loaded, config.calibration, text, calib_note = load_calibrated(
        ctx, model, peeked, "MLA conversion", dtype=dtype, calib=calib, calib_samples=calib_samples,
        eval_ppl=eval_ppl, data=data, check_loaded=lambda net, _: check_model(net, config))
    converted, report = to_mla(loaded.model, config)
    if calib_note:
        report.notes.append(calib_note)
    payload = before_after(model, report, loaded, converted, text, None, seqlen, max_windows)
    per_layer = " per layer, from" if "layer" in report.split_losses else ""
    split_note = "" if report.split is None else (f", key/value split{per_layer} {report.split:g}, rope key "
                                                  f"{report.rope_key}, unrotated {report.unrotated}")
    table = Table(title=f"{model}: {report.layout} layout ({report.target}{split_note})")
    for col in ("KV heads", "kv_lora_rank (of full)", "qk_nope / qk_rope / v dims",
                "rotated key keeps (min / median / max)", "latent keeps (min / median / max)",
                "check against reference"):
        table.add_column(col, justify="right")

    def spread(values: list[float]) -> str:
        return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"

    check = report.check
    rank = f"{report.kv_lora_rank} ({report.full_rank})" if report.layout == "mla" else "-"
    table.add_row(str(report.kv_heads), rank,
                  f"{report.qk_nope_head_dim} / {report.qk_rope_head_dim} / "
                  f"{getattr(converted.config, 'v_head_dim', report.qk_rope_head_dim)}",
                  spread([lr.rope_energy for lr in report.layers]), spread([lr.latent_energy for lr in report.layers]),
                  "-" if check is None else check_cell(check))
    console.print(table)
    print_summary(report, payload)
    save_model(converted, loaded.tokenizer, out, overwrite=overwrite, report=payload)
    console.print(f"saved to {out} (a stock {report.target}: AutoModelForCausalLM.from_pretrained loads it without "
                  "clover; clover export OUT --gguf F.gguf for llama.cpp)")
    if json_path:
        write_json(json_path, payload)
