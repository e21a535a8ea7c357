"""Decode speed and KV-cache size of 50% Q-K + V-O pruned models against the originals, in one run.

    python benchmarks/decode_speed.py [--contexts 512 2048] [--new-tokens 32] [--repeats 3]

Two models: a GPT-2-shaped random model (12 layers, hidden 768, 12 heads, 4096 positions; CLOVER criterion, as
random weights have no data to whiten with) and SmolLM2-135M (V-O whitened, Q-K by rotary-activation pairs on
WikiText-2 validation calibration). For each context length: prefill a random prompt of that many tokens, then time
``--new-tokens`` greedy decode steps with the KV cache (prefill excluded), batch 1, float32. The KV bytes per token
are read off the cache itself after prefill (every layer's K and V tensors), not computed from the config, so the
column shows what the runtime really stores. Original and pruned runs alternate and the median of ``--repeats`` is
kept, so drifting background load hits both alike. Prints a table, writes JSON, updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import (load_average, machine_info, machine_line, markdown_table, print_table,
                         update_benchmarks_md, write_json)
except ImportError:  # pragma: no cover - imported as benchmarks._report
    from ._report import (load_average, machine_info, machine_line, markdown_table, print_table,
                          update_benchmarks_md, write_json)

from clover.data import calibration_batches, load_rows
from clover.models import load
from clover.prune import PruneConfig, prune


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache: every layer's key and value tensors."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode(model, context: int, new_tokens: int, vocab: int, seed: int = 0) -> dict:
    """Prefill ``context`` random tokens, then time ``new_tokens`` single-token steps with the cache."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, context), generator=gen)
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    per_token = cache_bytes(cache) / context
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": new_tokens / seconds, "kv_bytes_per_token": per_token}


def gpt2_pair() -> tuple[str, torch.nn.Module, torch.nn.Module, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=4096, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    pruned, _ = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion="clover", progress=False))
    return "GPT-2-shaped random (124M), Q-K + V-O 50% clover", model, pruned, config.vocab_size


def smollm2_pair(data: str | None) -> tuple[str, torch.nn.Module, torch.nn.Module, int]:
    lm = load("smollm2-135m")
    calibration = calibration_batches(lm.tokenizer, load_rows(split="validation", data=data), 16, 512)
    config = PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion="whitened", qk_criterion="rotary-activation",
                         calibration=calibration, progress=False)
    pruned, _ = prune(lm.model, config)
    return ("SmolLM2-135M, V-O 50% whitened + Q-K 50% rotary-activation", lm.model.eval(), pruned,
            lm.model.config.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None, help="folder holding wikitext-2-raw-v1/ (else $CLOVER_DATA)")
    parser.add_argument("--json", default="benchmarks/results/decode_speed.json")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    info = machine_info()
    rows, results = [], []
    for build in (gpt2_pair, lambda: smollm2_pair(args.data)):
        name, original, pruned, vocab = build()
        for context in args.contexts:
            runs: dict[str, list[dict]] = {"original": [], "pruned": []}
            decode(original, 16, 2, vocab)  # warm-up: first calls allocate
            decode(pruned, 16, 2, vocab)
            for _ in tqdm(range(args.repeats), desc=f"{name[:20]} ctx {context}", unit="repeat"):
                for which, model in (("original", original), ("pruned", pruned)):
                    runs[which].append(decode(model, context, args.new_tokens, vocab))
            med = {w: statistics.median(r["tokens_per_s"] for r in runs[w]) for w in runs}
            kv = {w: runs[w][0]["kv_bytes_per_token"] for w in runs}
            entry = {"model": name, "context": context, "tokens_per_s": med, "kv_bytes_per_token": kv,
                     "speedup": med["pruned"] / med["original"], "kv_ratio": kv["pruned"] / kv["original"],
                     "all_runs": runs, "loadavg_1m_after": load_average()}
            results.append(entry)
            rows.append([name, context, f"{med['original']:.1f}", f"{med['pruned']:.1f}", f"{entry['speedup']:.2f}x",
                         f"{kv['original']:.0f}", f"{kv['pruned']:.0f}", f"{entry['kv_ratio']:.3f}"])
        del original, pruned

    columns = ["model", "context", "orig tok/s", "pruned tok/s", "speed ratio", "orig KV B/tok", "pruned KV B/tok",
               "KV ratio"]
    print_table(f"Decode, batch 1, float32, {args.new_tokens} new tokens after the prompt, median of {args.repeats}",
                columns, rows)
    command = (f"python benchmarks/decode_speed.py --contexts {' '.join(map(str, args.contexts))} "
               f"--new-tokens {args.new_tokens} --repeats {args.repeats}")
    write_json(args.json, {"machine": info, "command": command, "results": results})
    if not args.no_md:
        md = (f"Command: `{command}`\n\nMachine: {machine_line(info)}\n\n"
              f"Greedy decode with the KV cache, batch 1, float32, torch {info['torch_threads']} threads; "
              f"{args.new_tokens} new tokens timed after a random prompt of the given context length (prefill not "
              "timed); median tokens/s of the repeats, original and pruned alternating. KV bytes per token are "
              "measured on the cache after prefill.\n\n" + markdown_table(columns, rows) + "\n\n"
              f"Load average (1 min) after the last measurement: {results[-1]['loadavg_1m_after']} on "
              f"{info['cores']} cores (a load above the thread count means other work shared the CPU).\n")
        update_benchmarks_md("decode_speed", md)


if __name__ == "__main__":
    main()
