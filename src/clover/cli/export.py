"""``clover export``: a model -> one GGUF file for llama.cpp, checked by running it there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CloverError
from .common import DataOpt, JsonOpt, MaxWindowsOpt, ModelArg, OverwriteOpt, SeqlenOpt, check_model_fits, console, \
    load
from .report import test_text


def export(
    model: ModelArg,
    gguf: Annotated[Path, typer.Option("--gguf", help="The GGUF file to write.")],
    file_type: Annotated[str, typer.Option("--type", help="Tensor type: f32, f16 or q8_0 (1-D tensors, and tensors the "
                                                     "format needs exact, stay f32).")] = "f16",
    tokenizer_from: Annotated[Optional[str], typer.Option(help="A GGUF (or registry name) whose tokenizer metadata "
                                                               "is carried over; default: the model's source GGUF, "
                                                               "else tokenizer.json.")] = None,
    check: Annotated[bool, typer.Option(help="Run the file in llama.cpp and compare its logits with the model's "
                                             "(float32 cache).")] = True,
    eval_ppl: Annotated[bool, typer.Option(help="Also WikiText-2 test perplexity in llama.cpp and in transformers "
                                                "on the same windows.")] = False,
    seqlen: SeqlenOpt = 512,
    max_windows: MaxWindowsOpt = 8,
    data: DataOpt = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads for the check.")] = 1,
    overwrite: OverwriteOpt = False,
    json_path: JsonOpt = None,
):
    """Write a GGUF for llama.cpp: the llama architecture for LLaMA-family models, deepseek2 with the MLA metadata
    (a latent-only KV cache) for clover mla outputs; tokenizer metadata carried over."""
    import torch

    from ..export import engine
    from ..export.gguf import GgufConfig, export_gguf, writer_for
    from ..preflight import check_json, check_out_file, read_config
    from ..save import write_json

    config = GgufConfig(type=file_type, tokenizer_from=tokenizer_from)
    config.check()
    if gguf.suffix.lower() != ".gguf":
        raise CloverError(f"--gguf {gguf} should end in .gguf: llama.cpp finds files by it")
    if gguf.exists() and not overwrite:
        raise CloverError(f"--gguf {gguf} exists: pass --overwrite to replace it, or choose another file")
    check_out_file(gguf, "--gguf", (".gguf",))
    check_json(json_path)
    if (check or eval_ppl) and not engine.available():
        raise CloverError("--check and --eval-ppl run llama.cpp, whose Python binding is not installed: run "
                          "scripts/setup, or pass --no-check")
    peeked = read_config(model)
    if peeked is not None:
        writer_for(peeked)
        if eval_ppl:
            check_model_fits(peeked, model, {"--seqlen": seqlen}, "--eval-ppl (next-token perplexity)")
    text = test_text(eval_ppl, data)
    loaded = load(model, None)
    folder = Path(model) if Path(model).is_dir() else None
    with console.status(f"writing {gguf}"):
        report = export_gguf(loaded.model, model, folder, gguf, config)
    payload = {"model": model, **report.to_dict()}
    table = Table(title=f"{model} -> {gguf} ({report.architecture}, {report.file_type})")
    for col in ("tensors", "MiB", "tokenizer", "llama.cpp logits vs transformers (relative)"):
        table.add_column(col, justify="right")
    diff = "-"
    if check:
        ids = torch.randint(0, loaded.model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0))
        with console.status("running it in llama.cpp"):
            got = engine.logits(gguf, ids, threads=threads)
        from ..verify import model_outputs

        want = model_outputs(loaded.model, {"input_ids": ids[None], "use_cache": False})[0]
        payload["check_relative_diff"] = float((got - want).abs().max() / want.abs().max())
        diff = f"{payload['check_relative_diff']:.1e}"
    table.add_row(str(report.tensors), f"{report.bytes / 2**20:,.1f}", report.tokenizer, diff)
    console.print(table)
    if eval_ppl:
        from ..evaluate import _token_ids, perplexity

        result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, max_windows=max_windows,
                            progress=True)
        ids = _token_ids(loaded.tokenizer, text)
        windows = ids[: result.windows * seqlen].reshape(result.windows, seqlen)
        with console.status("perplexity in llama.cpp"):
            engine_ppl = engine.perplexity(gguf, windows, threads=threads)
        payload.update(ppl_transformers=result.ppl, ppl_llama_cpp=engine_ppl,
                       ppl_protocol={"seqlen": seqlen, "windows": result.windows, "split": "test"})
        console.print(f"WikiText-2 test perplexity ({result.windows} x {seqlen}): transformers {result.ppl:.3f}, "
                      f"llama.cpp {engine_ppl:.3f} ({engine_ppl / result.ppl - 1:+.2%})")
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"written to {gguf}")
    if json_path:
        write_json(json_path, payload)
