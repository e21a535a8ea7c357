"""SmolLM2's exports in llama.cpp: decode speed at depth, the KV buffer llama.cpp allocates, how many 4K sequences fit
one KV budget, and perplexity through llama.cpp next to transformers' on the same windows.

    CLOVER_DATA=../shared/data python benchmarks/engine_decode.py [--depths 512,4096,16384] [--threads 1]
    python benchmarks/engine_decode.py --render benchmarks/results/engine_decode.json   # tables from a saved run

Models (all exported as f16 GGUFs by `clover export`'s writer): the original; `clover mla` at full rank (the cache
of the original: what remains is the rotation the format cannot hold), KV 50% and 25%, converted with the rotary
split alone (`--unrotated nope --no-o-refit`, as first measured; the default levers change weights, not speed:
their quality is in mla_quality)
(deepseek2 with MLA metadata: the cache holds the latent and the rotated key); `--layout gqa --kv-heads 1` (plain
llama, a third of the cache); the original and MLA 50% with llama.cpp's q8_0 KV cache (the peer a llama.cpp user
reaches for). V-O-pruned models are not exportable (llama.cpp's llama graph asserts value length == key length).
Decode: a prompt of `depth` test tokens is evaluated, then `--new-tokens` tokens are timed one at a time, and
again with `--sequences` sequences in parallel (each its own cache of that depth), through llama.cpp's batched
decode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, machine_info, machine_line, markdown_table, print_table, smollm2_calibrated, \
    update_benchmarks_md, write_json  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "engine_decode.json"
WORK = REPO_ROOT / "out" / "engine_decode"
BUDGET = 2**30  # one GiB of KV cache: how many 4K-token sequences fit
ROWS = [("original", "f16"), ("original", "q8_0"), ("MLA full rank", "f16"), ("MLA KV 50%", "f16"),
        ("MLA KV 50%", "q8_0"), ("MLA KV 25%", "f16"), ("fewer KV heads (1 of 3)", "f16")]


def build(lm, calib, wanted: set[str]) -> dict[str, dict]:
    """The models and their GGUFs (cached under out/engine_decode/)."""
    from clover.export import GgufConfig, export_gguf
    from clover.mla import MlaConfig, to_mla

    WORK.mkdir(parents=True, exist_ok=True)
    # the rotary split alone, as this table was first measured: the quality levers (refit, O refit; mla_quality)
    # change weights, not shapes, so speed and cache size are theirs too
    plain = dict(unrotated="nope", o_refit=False, calibration=calib, progress=False)
    models = {"original": (lambda: lm.model),
              "MLA full rank": (lambda: to_mla(lm.model, MlaConfig(kv_ratio=0.0, **plain))[0]),
              "MLA KV 50%": (lambda: to_mla(lm.model, MlaConfig(kv_ratio=0.5, **plain))[0]),
              "MLA KV 25%": (lambda: to_mla(lm.model, MlaConfig(kv_ratio=0.75, **plain))[0]),
              "fewer KV heads (1 of 3)": (lambda: to_mla(lm.model, MlaConfig(layout="gqa", kv_heads=1,
                                                                           calibration=calib, progress=False))[0])}
    built = {}
    for name, make in models.items():
        if name not in wanted:
            continue
        path = WORK / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".gguf")
        model = make()
        if not path.is_file():
            export_gguf(model, "smollm2-135m", None, path, GgufConfig(type="f16"))
        built[name] = {"model": model, "path": path}
    return built


def flash(cache_type: int | None, flash_attn: bool) -> bool:
    """llama.cpp quantizes the V cache only with flash attention: a q8_0 cache runs with it on."""
    return flash_attn or cache_type is not None


def kv_buffer_mib(path: Path, n_ctx: int, cache_type: int | None, threads: int) -> float:
    """The KV buffer llama.cpp reports for ``n_ctx`` tokens (its load log, read from stderr)."""
    import llama_cpp

    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            kwargs = {} if cache_type is None else {"type_k": cache_type, "type_v": cache_type}
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=True,
                                  flash_attn=flash(cache_type, False), **kwargs)
            llm.close()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read()
    sizes = [float(m) for m in re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", text)]
    return sum(sizes)


def decode_speeds(path: Path, prompt: torch.Tensor, new_tokens: int, sequences: int, cache_type: int | None,
                  threads: int, flash_attn: bool, repeats: int = 1) -> dict:
    """Decode tokens/s after a prompt of ``len(prompt)`` tokens, with one sequence and with ``sequences`` in
    parallel (each its own cache stream: the prompt is evaluated once and copied, so every sequence reads its own
    cache of that depth at every step), through llama.cpp's batched decode."""
    import llama_cpp as L

    from clover.export.engine import _quiet_stderr

    depth = len(prompt)
    with _quiet_stderr():
        L.llama_backend_init()
        model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = sequences * (depth + (repeats + 1) * new_tokens + 16)
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        params.flash_attn_type = 1 if flash(cache_type, flash_attn) else 0
        if cache_type is not None:
            params.type_k = params.type_v = cache_type
        ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(512, 0, sequences)

    def submit(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on {path}")

    try:
        start = time.perf_counter()
        for first in range(0, depth, 512):
            chunk = prompt[first:first + 512]
            submit([(int(t), first + k, 0, k == len(chunk) - 1) for k, t in enumerate(chunk)])
        prefill = time.perf_counter() - start
        token = int(prompt[-1])
        runs = []
        for run in range(repeats):  # repeats continue the sequence: depth grows by new_tokens each time
            start = time.perf_counter()
            for step in range(new_tokens):
                submit([(token, depth + run * new_tokens + step, 0, True)])
            runs.append(new_tokens / (time.perf_counter() - start))
        depth += (repeats - 1) * new_tokens
        if sequences == 1:
            return {"tokens_per_s": sum(runs) / repeats, "tokens_per_s_runs": runs, "prefill_s": prefill}
        with _quiet_stderr():
            memory = L.llama_get_memory(ctx)
            for seq in range(1, sequences):
                L.llama_memory_seq_cp(memory, 0, seq, -1, -1)
            submit([(token, depth + new_tokens, seq, True) for seq in range(sequences)])  # the copies happen here
        start = time.perf_counter()
        for step in range(1, new_tokens + 1):
            submit([(token, depth + new_tokens + step, seq, True) for seq in range(sequences)])
        parallel = sequences * new_tokens / (time.perf_counter() - start)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return {"tokens_per_s": sum(runs) / repeats, f"tokens_per_s_{sequences}_sequences": parallel,
            "prefill_s": prefill}


def selected(model: str, cache: str, only: set[str]) -> bool:
    return model in only or f"{model}/{cache}" in only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="512,4096,16384")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flash-attn", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=4, help="Parallel sequences for the batched decode.")
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--only", default=None, help="Measure only these rows (comma-separated model names as in "
                        "the table, or 'name/cache' for one cache type) and keep the other rows of the saved run: "
                        "finishing a stopped run.")
    parser.add_argument("--render", type=Path, default=None, help="Only print and write the tables of a saved run.")
    args = parser.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()))
        return

    from clover.data import load_text
    from clover.evaluate import _token_ids, perplexity
    from clover.export import engine

    depths = [int(d) for d in args.depths.split(",")]
    info = machine_info()
    lm, calib = smollm2_calibrated()
    text = load_text(split="test")
    ids = _token_ids(lm.tokenizer, text)
    windows = ids[: args.ppl_windows * 512].reshape(args.ppl_windows, 512)
    configs = [(name, engine.Q8_0 if cache == "q8_0" else None) for name, cache in ROWS]
    rows, runs = [], [info]
    if args.only:  # finish a stopped run: its rows stay, with the machine line of the run that measured them
        only = {n.strip() for n in args.only.split(",")}
        configs = [c for c in configs if selected(c[0], "q8_0" if c[1] == engine.Q8_0 else "f16", only)]
        saved = json.loads(RESULTS.read_text())
        rows = [r for r in saved["rows"] if not selected(r["model"], r["cache"], only)]
        runs = saved.get("runs", [saved["machine"]]) + [info]
        info = saved["machine"]
        table_depths = sorted(set(saved["depths"]) | set(depths))  # a finishing run may measure fewer depths
        not_run = [line for line in saved.get("not_run", []) if not any(n in line for n in only)] + \
            [f"{name}/{'q8_0' if cache else 'f16'} at depth {d}: not measured by the run that finished this row"
             for name, cache in configs for d in table_depths if d not in depths]
    else:
        table_depths, not_run = depths, []
    built = build(lm, calib, {name for name, _ in configs})
    for name, cache in configs:
        entry = built[name]
        if "ppl_transformers" not in entry:
            entry["ppl_transformers"] = perplexity(entry["model"], lm.tokenizer, text, seqlen=512,
                                                   max_windows=args.ppl_windows, progress=False).ppl
        llm_ppl = engine.perplexity(entry["path"], windows, args.threads, cache, flash(cache, False))
        mib = kv_buffer_mib(entry["path"], 4096, cache, args.threads)
        per_token = mib * 2**20 / 4096
        row = {"model": name, "cache": "q8_0" if cache == engine.Q8_0 else "f16", "kv_mib_at_4096": mib,
               "kv_bytes_per_token": per_token, "sequences_of_4096_in_1gib": int(BUDGET // (per_token * 4096)),
               "weights_bytes": entry["path"].stat().st_size, "ppl_llama_cpp": llm_ppl,
               "ppl_transformers": entry["ppl_transformers"], "decode": {}, "run": len(runs) - 1}
        for depth in depths:
            measured = decode_speeds(entry["path"], ids[:depth], args.new_tokens, args.sequences, cache,
                                     args.threads, args.flash_attn)
            row["decode"][str(depth)] = {**measured, "bytes_read_per_token": row["weights_bytes"] + depth * per_token}
            print(f"{name} ({row['cache']} cache) depth {depth}: {measured}", flush=True)
        rows.append(row)
        payload = {"machine": info, "threads": args.threads, "flash_attn": args.flash_attn, "depths": table_depths,
                   "not_run": not_run,
                   "sequences": args.sequences,
                   "new_tokens": args.new_tokens, "ppl_windows": args.ppl_windows, "rows": rows,
                   "runs": runs, "loadavg_end": os.getloadavg()[0], "command": "python benchmarks/engine_decode.py " +
                   " ".join(sys.argv[1:])}
        write_json(RESULTS, payload)  # partial runs keep what they measured
    render(payload)


def goals_of(payload: dict) -> list[str]:
    rows = payload["rows"]
    base = next(r for r in rows if r["model"] == "original" and r["cache"] == "f16")
    deepest = str(max(payload["depths"]))
    lines = []
    fast = [r for r in rows if r is not base and r["kv_bytes_per_token"] <= base["kv_bytes_per_token"] / 2
            and deepest in r["decode"]
            and r["decode"][deepest]["tokens_per_s"] >= 1.3 * base["decode"][deepest]["tokens_per_s"]
            and r["ppl_llama_cpp"] <= 1.3 * base["ppl_llama_cpp"]]
    lines.append(f"at depth {deepest}, an export with at most half the cache decoding >= 1.3x the original at <= 1.3x "
                 f"base ppl: {'MET by ' + ', '.join(r['model'] for r in fast) if fast else 'NOT MET'}")
    mla = next((r for r in rows if r["model"] == "MLA KV 50%" and r["cache"] == "f16"), None)
    if mla:
        ratio = mla["sequences_of_4096_in_1gib"] / max(base["sequences_of_4096_in_1gib"], 1)
        lines.append(f"MLA KV 50% holds twice the 4K sequences in one KV budget: {ratio:.2f}x -> "
                     f"{'MET' if ratio >= 2 else 'NOT MET'}")
    worst = max(abs(r["ppl_llama_cpp"] / r["ppl_transformers"] - 1) for r in rows if r["cache"] == "f16")
    lines.append(f"llama.cpp perplexity equals transformers' for every export (f16 weights and cache): worst "
                 f"{worst:.2%} -> {'MET' if worst < 0.01 else 'NOT MET'}")
    parallel = f"tokens_per_s_{payload['sequences']}_sequences"
    faster = [r["model"] + f" ({r['cache']})" for r in rows if r is not base and deepest in r["decode"]
              and r["decode"][deepest][parallel] > base["decode"][deepest][parallel]]
    lines.append(f"with {payload['sequences']} parallel sequences at depth {deepest}, faster than the original: "
                 + (", ".join(faster) if faster else "none"))
    lines += crossovers(payload)
    return lines


def crossovers(payload: dict) -> list[str]:
    """Where each MLA export decodes faster than the original (same cache type), by depth and parallel sequences:
    absorbed MLA reads fewer bytes per cached token but does more arithmetic on each, so depth decides."""
    rows = payload["rows"]
    parallel = f"tokens_per_s_{payload['sequences']}_sequences"
    lines = []
    for r in rows:
        base = next((b for b in rows if b["model"] == "original" and b["cache"] == r["cache"]), None)
        if not r["model"].startswith("MLA") or base is None:
            continue
        cells = []
        for d in map(str, payload["depths"]):
            if d in r["decode"] and d in base["decode"]:
                one = r["decode"][d]["tokens_per_s"] / base["decode"][d]["tokens_per_s"]
                many = r["decode"][d][parallel] / base["decode"][d][parallel]
                cells.append(f"@{d} {one:.2f}x / {many:.2f}x")
        lines.append(f"{r['model']} ({r['cache']}) decode speed over the original's, 1 / {payload['sequences']} "
                     f"sequences: " + ", ".join(cells))
    return lines


def render(payload: dict) -> None:
    depths = [str(d) for d in payload["depths"]]
    parallel = f"tokens_per_s_{payload['sequences']}_sequences"
    columns = (["model", "KV cache", "flash attn", "KV MiB at 4096", "KV bytes/token", "4K seqs in 1 GiB",
                "ppl llama.cpp", "ppl transformers"] + [f"tok/s @{d}" for d in depths]
               + [f"tok/s @{d} x{payload['sequences']} seqs" for d in depths]
               + [f"MB read/token @{d}" for d in depths])
    table = []
    for r in sorted(payload["rows"], key=lambda r: ROWS.index((r["model"], r["cache"]))):
        on = flash(None if r["cache"] == "f16" else 8, payload["flash_attn"])
        table.append([r["model"], r["cache"], "on" if on else "off", f"{r['kv_mib_at_4096']:.1f}",
                      f"{r['kv_bytes_per_token']:,.0f}",
                      r["sequences_of_4096_in_1gib"], f"{r['ppl_llama_cpp']:.2f}", f"{r['ppl_transformers']:.2f}"]
                     + [f"{r['decode'][d]['tokens_per_s']:.2f}" if d in r["decode"] else "-" for d in depths]
                     + [f"{r['decode'][d][parallel]:.2f}" if d in r["decode"] else "-" for d in depths]
                     + [f"{r['decode'][d]['bytes_read_per_token'] / 1e6:,.0f}" if d in r["decode"] else "-"
                        for d in depths])
    title = (f"SmolLM2-135M exports in llama.cpp (f16 weights, {payload['threads']} thread(s), flash attention "
             f"{'on' if payload['flash_attn'] else 'off'} except where a q8_0 cache needs it, "
             f"{payload['new_tokens']} decoded tokens per depth)")
    print_table(title, columns, table)
    goals = goals_of(payload)
    for line in goals:
        print("goal:", line)
    for line in payload.get("not_run", []):  # a stopped run says what it did not measure
        print("not run:", line)
    runs = payload.get("runs", [payload["machine"]])
    machines = "; ".join(f"run {i}: {machine_line(m)}" for i, m in enumerate(runs)) if len(runs) > 1 else \
        machine_line(payload["machine"])
    md = (f"Command: `{payload['command']}`\n\nMachine: {machines}; load average at the end "
          f"{payload['loadavg_end']:.2f}\n\n{title}. Perplexity: WikiText-2 test, {payload['ppl_windows']} x 512, the "
          "same windows in both engines. `MB read/token` is the bound decode speed has to beat: the weights plus "
          "the cache at that depth, read once per token. MLA rows: the rotary split alone (`--unrotated nope "
          "--no-o-refit`); the default levers change weights, not shapes or speed, and their perplexity is in "
          "mla_quality.\n\n" + markdown_table(columns, table)
          + "\n\nGoals:\n\n" + "\n".join(f"- {line}" for line in goals)
          + "".join(f"\n- NOT RUN: {line}" for line in payload.get("not_run", [])))
    update_benchmarks_md("engine_decode", md)


if __name__ == "__main__":
    main()
