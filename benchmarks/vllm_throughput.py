"""vLLM generation throughput of a model and of its MLA conversion, side by side (needs a CUDA GPU and vLLM).

    pip install vllm                      # not in clover's pinned set: vLLM pins its own torch and CUDA
    clover mla MODEL --kv-ratio R --preset vllm --out out/model-mla      # kv_lora_rank + rope in {320, 576}
    python benchmarks/vllm_throughput.py MODEL out/model-mla [--prompts 256] [--prompt-len 1024] [--new 256]

For each model: load it in vLLM (the MLA conversion is a stock DeepseekV3ForCausalLM, so vLLM runs its MLA
backend with a latent-only cache), report the KV-cache capacity vLLM allocates (tokens that fit in the memory it
gives the cache) and the generation throughput over ``--prompts`` random prompts of ``--prompt-len`` tokens,
``--new`` greedy tokens each. Writes benchmarks/results/vllm_throughput.json. Not run in this repository's CI or on
its CPU machines (no GPU); BENCHMARKS.md says so until a GPU run writes its section.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, machine_info, markdown_table, print_table, update_benchmarks_md, write_json  # noqa: E402


def measure(path: str, prompts: int, prompt_len: int, new: int, gpu_memory: float) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", gpu_memory_utilization=gpu_memory, enforce_eager=False, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    generator = torch.Generator().manual_seed(0)
    batch = [{"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()}
             for _ in range(prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate(batch[:2], params)  # warm-up: compilation and CUDA graphs
    start = time.perf_counter()
    outputs = llm.generate(batch, params)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {"model": path, "seconds": seconds, "generated_tokens": generated,
              "tokens_per_s": generated / seconds, "kv_cache_blocks": cache.num_gpu_blocks,
              "block_size": cache.block_size,
              "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original")
    parser.add_argument("converted")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--gpu-memory", type=float, default=0.85)
    args = parser.parse_args()
    rows = [measure(p, args.prompts, args.prompt_len, args.new, args.gpu_memory)
            for p in (args.original, args.converted)]
    payload = {"machine": machine_info(), "args": vars(args), "rows": rows,
               "command": "python benchmarks/vllm_throughput.py " + " ".join(sys.argv[1:])}
    write_json(REPO_ROOT / "benchmarks" / "results" / "vllm_throughput.json", payload)
    columns = ["model", "tokens/s", "KV cache tokens", "vs original"]
    table = [[r["model"], f"{r['tokens_per_s']:.0f}", f"{r['kv_cache_tokens']:,}",
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x"] for r in rows]
    print_table("vLLM generation throughput", columns, table)
    update_benchmarks_md("vllm_throughput", f"Command: `{payload['command']}`\n\n" + markdown_table(columns, table))


if __name__ == "__main__":
    main()
