"""Peak memory and wall time of in-memory vs streamed conversion of the same sharded LLaMA-shaped checkpoint.

    python benchmarks/streaming_memory.py [--layers 16] [--hidden 1024] [--json PATH]

A random LLaMA checkpoint (float32, GQA, several shards) is written once to a temporary folder. Each conversion
(orthogonalize; whitened prune of V-O by 50% with 8 x 128 calibration tokens) runs in its own fresh subprocess:
in memory = ``clover.models.load`` + the verb + ``save_model``; streamed = ``clover.streaming``. Peak resident
memory is the subprocess's VmHWM, reset after imports (so the ~0.3 GB of torch + transformers is not counted);
wall time covers loading, converting and saving. Prints a table, writes JSON and the ``streaming_memory``
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json
except ImportError:  # pragma: no cover - imported as benchmarks._report
    from ._report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_md, write_json

REPO = Path(__file__).resolve().parents[1]

RUN = r"""
import json, sys, time, warnings
import torch, transformers, clover
from clover.models import load
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.prune import PruneConfig, prune
from clover.save import save_model
from clover.streaming import StreamOptions, stream_orthogonalize, stream_prune
warnings.simplefilter("ignore")
source, out, verb, mode, vocab = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

calibration = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
prune_config = PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calibration, progress=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
start = time.perf_counter()
if mode == "streamed":
    if verb == "orthogonalize":
        stream_orthogonalize(source, out, OrthogonalizeConfig(progress=False), StreamOptions(progress=False))
    else:
        stream_prune(source, out, prune_config, StreamOptions(progress=False))
else:
    lm = load(source)
    if verb == "orthogonalize":
        orthogonalize_(lm.model, OrthogonalizeConfig(progress=False))
        save_model(lm.model, None, out)
    else:
        pruned, _ = prune(lm.model, prune_config)
        save_model(pruned, None, out)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": status("VmHWM:") - base}))
"""


def build_checkpoint(folder: Path, layers: int, hidden: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), intermediate_size=2 * hidden, vocab_size=vocab,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(source: Path, scratch: Path, verb: str, mode: str, vocab: int) -> dict:
    out = scratch / f"{verb}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", RUN, str(source), str(out), verb, mode, str(vocab)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin",
                                                               "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{verb} {mode} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", default="benchmarks/results/streaming_memory.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="clover-streaming-") as tmp:
        scratch = Path(tmp)
        source = scratch / "checkpoint"
        size = build_checkpoint(source, args.layers, args.hidden, args.vocab)
        shards = len(list(source.glob("*.safetensors")))
        rows, results = [], []
        for verb in ("orthogonalize", "prune"):
            memory = measure(source, scratch, verb, "in-memory", args.vocab)
            streamed = measure(source, scratch, verb, "streamed", args.vocab)
            result = {"verb": verb, "in_memory": memory, "streamed": streamed,
                      "peak_ratio": streamed["peak_bytes"] / memory["peak_bytes"],
                      "time_ratio": streamed["seconds"] / memory["seconds"]}
            results.append(result)
            rows.append([verb, f"{memory['peak_bytes'] / 2**20:,.0f}", f"{streamed['peak_bytes'] / 2**20:,.0f}",
                         f"{result['peak_ratio']:.2f}", f"{streamed['peak_bytes'] / size:.2f}",
                         f"{memory['seconds']:.1f}", f"{streamed['seconds']:.1f}", f"{result['time_ratio']:.2f}"])
    columns = ["conversion", "in-memory peak MiB", "streamed peak MiB", "streamed / in-memory peak",
               "streamed peak / checkpoint", "in-memory s", "streamed s", "streamed / in-memory time"]
    shape = (f"{args.layers} layers, hidden {args.hidden}, {args.hidden // 64} heads / {max(1, args.hidden // 256)} "
             f"KV heads, vocab {args.vocab}, float32: {size / 2**20:,.0f} MiB in {shards} shards")
    print_table(f"streaming vs in-memory ({shape})", columns, rows)
    payload = {"machine": info, "checkpoint": {"bytes": size, "shards": shards, "layers": args.layers,
                                               "hidden": args.hidden, "vocab": args.vocab}, "results": results}
    write_json(REPO / args.json if not Path(args.json).is_absolute() else args.json, payload)
    if not args.no_md:
        update_benchmarks_md("streaming_memory", "\n\n".join([
            "## streaming_memory",
            "Command: `python benchmarks/streaming_memory.py`",
            f"Machine: {machine_line(info)}",
            f"Random LLaMA checkpoint: {shape}. Each run is a fresh subprocess (one BLAS thread); peak is the "
            "resident-memory high-water mark (VmHWM) above the process's size after importing torch + transformers "
            "+ clover; time covers load, convert, save. Prune = whitened V-O 50% with 8 x 128 calibration tokens.",
            markdown_table(columns, rows),
        ]))


if __name__ == "__main__":
    main()
