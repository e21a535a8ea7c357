"""Speed and accuracy of ``clover.decompose.decompose`` against the naive full-product SVD.

GPT-2-XL-shaped random attention (hidden 1600, 25 heads of 64, Q/K/V/O with biases, weights ~ N(0, 0.02)).
Per head the Q-K pair is ``left = [W_q^h | b_q^h]^T``, ``right = [W_k^h | b_k^h]^T`` (both (D+1, 64)) and the
V-O pair is ``left = W_o[:, h]`` (D, 64), ``right = [W_v^h | b_v^h]^T`` (D+1, 64); all 25 heads form one batch.

* ours:  ``decompose(left, right, compute_dtype=dtype)`` on the batch (thin QRs + SVD of the 64 x 64 core).
* naive: what the paper's reference code does, per head: form ``M = left @ right.T`` in ``dtype``, full
  ``torch.linalg.svd(M, full_matrices=False)``, keep the top 64, ``left' = U sqrt(S)``, ``right' = V sqrt(S)``.

Reconstruction error is ``max |left' @ right'.T - M_ref|`` with ``M_ref`` the product in float64 (also reported
relative to ``max |M_ref|``). One layer is timed both ways; then ours alone on ``--layers`` fresh layers.

    python benchmarks/decompose_speed.py [--layers 48] [--dtype float64|float32]
        [--json benchmarks/results/decompose_speed.json] [--no-md] [--threads N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch

try:  # run as a script: benchmarks/ is sys.path[0]
    from _report import (load_average, machine_info, machine_line, markdown_table, print_table,
                         update_benchmarks_md, write_json)
except ImportError:  # imported as benchmarks.decompose_speed
    from benchmarks._report import (  # type: ignore[no-redef]
        load_average,
        machine_info,
        machine_line,
        markdown_table,
        print_table,
        update_benchmarks_md,
        write_json,
    )

from clover.decompose import decompose

HIDDEN = 1600
HEADS = 25
HEAD_DIM = 64
INIT_STD = 0.02
SECTION = "decompose_speed"
SPEEDUP_GOAL = 100.0
LAYERS_GOAL_S = 30.0
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Pair:
    name: str
    left: torch.Tensor  # (G, m, d)
    right: torch.Tensor  # (G, n, d)


def make_layer(seed: int) -> dict[str, torch.Tensor]:
    """Random GPT-2-XL attention weights in nn.Linear orientation (out, in), float32 like a real checkpoint."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * INIT_STD

    return {
        "w_q": normal(HIDDEN, HIDDEN),
        "b_q": normal(HIDDEN),
        "w_k": normal(HIDDEN, HIDDEN),
        "b_k": normal(HIDDEN),
        "w_v": normal(HIDDEN, HIDDEN),
        "b_v": normal(HIDDEN),
        "w_o": normal(HIDDEN, HIDDEN),
        "b_o": normal(HIDDEN),  # carried for shape fidelity; the output bias is not part of any pair
    }


def _heads_with_bias(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[W^h | b^h]^T`` for every head: (HEADS, D+1, HEAD_DIM)."""
    w = weight.reshape(HEADS, HEAD_DIM, HIDDEN)
    b = bias.reshape(HEADS, HEAD_DIM, 1)
    return torch.cat([w, b], dim=-1).mT.contiguous()


def make_pairs(layer: dict[str, torch.Tensor]) -> list[Pair]:
    qk = Pair("Q-K", _heads_with_bias(layer["w_q"], layer["b_q"]), _heads_with_bias(layer["w_k"], layer["b_k"]))
    o_heads = layer["w_o"].reshape(HIDDEN, HEADS, HEAD_DIM).permute(1, 0, 2).contiguous()  # (HEADS, D, HEAD_DIM)
    vo = Pair("V-O", o_heads, _heads_with_bias(layer["w_v"], layer["b_v"]))
    return [qk, vo]


def ours(pair: Pair, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    out = decompose(pair.left, pair.right, compute_dtype=dtype)
    return out.left, out.right


def naive(pair: Pair, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference approach: full product per head, full SVD, truncate to head_dim."""
    d = pair.left.shape[-1]
    lefts, rights = [], []
    for h in range(pair.left.shape[0]):
        m = pair.left[h].to(dtype) @ pair.right[h].to(dtype).T
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        root = s[:d].sqrt()
        lefts.append(u[:, :d] * root)
        rights.append(vh[:d].T * root)
    return torch.stack(lefts), torch.stack(rights)


def reconstruction_error(pair: Pair, left: torch.Tensor, right: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |M_ref|) of ``left @ right.T`` against the float64 product."""
    worst_err, worst_ref = 0.0, 0.0
    for h in range(pair.left.shape[0]):
        ref = pair.left[h].double() @ pair.right[h].double().T
        got = left[h].double() @ right[h].double().T
        worst_err = max(worst_err, (got - ref).abs().max().item())
        worst_ref = max(worst_ref, ref.abs().max().item())
    return worst_err, worst_err / worst_ref


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=48, help="layers for the ours-only timing (GPT-2-XL has 48)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="compute dtype for both methods")
    p.add_argument("--json", default="benchmarks/results/decompose_speed.json", help="where to write results")
    p.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="layer i uses seed + i")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of ours on the comparison layer (median)")
    p.add_argument("--naive-repeats", type=int, default=2, help="timed runs of naive (fastest is kept)")
    return p.parse_args(argv)


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 else f"{x:.2e}"


def fmt_e(x: float) -> str:
    return f"{x:.2e}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    command = shlex.join(["python", "benchmarks/decompose_speed.py", *(sys.argv[1:] if argv is None else argv)])
    info = machine_info()
    print(f"machine: {machine_line(info)}")
    print(f"command: {command}")

    # ---- one layer: naive vs ours -------------------------------------------------------------------------
    pairs = make_pairs(make_layer(args.seed))
    comparison = []
    for pair in pairs:
        m, n = pair.left.shape[-2], pair.right.shape[-2]
        for _ in range(2):  # warm-up (allocator, LAPACK workspaces)
            ours(pair, dtype)
        ours_times = []
        for _ in range(args.repeats):
            t, (o_left, o_right) = timed(ours, pair, dtype)
            ours_times.append(t)
        naive_times = []
        for _ in range(args.naive_repeats):
            t, (n_left, n_right) = timed(naive, pair, dtype)
            naive_times.append(t)
            print(f"  naive {pair.name}: {t:.2f} s")
        ours_err, ours_rel = reconstruction_error(pair, o_left, o_right)
        naive_err, naive_rel = reconstruction_error(pair, n_left, n_right)
        ours_s, naive_s = statistics.median(ours_times), min(naive_times)
        comparison.append(
            {
                "pair": pair.name,
                "heads": pair.left.shape[0],
                "product_shape": [m, n],
                "ours_s": ours_s,
                "ours_times_s": ours_times,
                "naive_s": naive_s,
                "naive_times_s": naive_times,
                "speedup": naive_s / ours_s,
                "ours_max_abs_err": ours_err,
                "ours_rel_err": ours_rel,
                "naive_max_abs_err": naive_err,
                "naive_rel_err": naive_rel,
            }
        )
    ours_layer_s = sum(r["ours_s"] for r in comparison)
    naive_layer_s = sum(r["naive_s"] for r in comparison)
    ratio = naive_layer_s / ours_layer_s

    # ---- all layers: ours only ----------------------------------------------------------------------------
    per_layer = []
    for i in range(args.layers):
        layer_pairs = make_pairs(make_layer(args.seed + i))  # outside the timed region
        row: dict[str, object] = {"layer": i}
        for pair in layer_pairs:
            t, (o_left, o_right) = timed(ours, pair, dtype)
            err, rel = reconstruction_error(pair, o_left, o_right)
            key = pair.name.lower().replace("-", "")
            row.update({f"{key}_s": t, f"{key}_max_abs_err": err, f"{key}_rel_err": rel})
        row["total_s"] = row["qk_s"] + row["vo_s"]
        per_layer.append(row)
    layers_total_s = sum(r["total_s"] for r in per_layer)
    worst_layer_rel = max((max(r["qk_rel_err"], r["vo_rel_err"]) for r in per_layer), default=float("nan"))

    # ---- goals, computed from the measurements ------------------------------------------------------------
    error_not_worse = all(r["ours_rel_err"] <= r["naive_rel_err"] for r in comparison)
    goals = {
        "speedup_ge_100": ratio >= SPEEDUP_GOAL,
        "ours_error_le_naive": error_not_worse,
        "layers_48_total_lt_30s": (layers_total_s < LAYERS_GOAL_S) if args.layers == 48 else None,
    }

    # ---- report ---------------------------------------------------------------------------------------------
    cols = ["pair", "product", "naive s", "ours s", "speedup", "naive max err", "ours max err", "naive rel err",
            "ours rel err"]
    rows = [
        [r["pair"], f"{HEADS} x {r['product_shape'][0]}x{r['product_shape'][1]}", fmt_s(r["naive_s"]),
         fmt_s(r["ours_s"]), f"{r['speedup']:.1f}x", fmt_e(r["naive_max_abs_err"]), fmt_e(r["ours_max_abs_err"]),
         fmt_e(r["naive_rel_err"]), fmt_e(r["ours_rel_err"])]
        for r in comparison
    ]
    rows.append(["layer", "Q-K + V-O", fmt_s(naive_layer_s), fmt_s(ours_layer_s), f"{ratio:.1f}x",
                 fmt_e(max(r["naive_max_abs_err"] for r in comparison)),
                 fmt_e(max(r["ours_max_abs_err"] for r in comparison)),
                 fmt_e(max(r["naive_rel_err"] for r in comparison)),
                 fmt_e(max(r["ours_rel_err"] for r in comparison))])
    title = f"One GPT-2-XL layer, {args.dtype}: naive (min of {args.naive_repeats}) vs ours (median of {args.repeats})"
    print_table(title, cols, rows)

    layer_times = [r["total_s"] for r in per_layer]
    cols2 = ["layers", "total s", "mean s/layer", "median s/layer", "min s/layer", "max s/layer", "worst rel err"]
    rows2 = [[str(args.layers), fmt_s(layers_total_s),
              fmt_s(statistics.mean(layer_times)) if layer_times else "-",
              fmt_s(statistics.median(layer_times)) if layer_times else "-",
              fmt_s(min(layer_times)) if layer_times else "-",
              fmt_s(max(layer_times)) if layer_times else "-", fmt_e(worst_layer_rel)]]
    print_table(f"Ours on {args.layers} fresh layers (Q-K + V-O), {args.dtype}", cols2, rows2)

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    goal_lines = [
        f"speedup naive/ours on one layer >= {SPEEDUP_GOAL:g}x: {ratio:.1f}x -> {mark(goals['speedup_ge_100'])}",
        "ours reconstruction error <= naive (relative, per pair): "
        + ", ".join(f"{r['pair']} {fmt_e(r['ours_rel_err'])} vs {fmt_e(r['naive_rel_err'])}" for r in comparison)
        + f" -> {mark(goals['ours_error_le_naive'])}",
        f"48 layers in < {LAYERS_GOAL_S:g} s: "
        + (f"{layers_total_s:.2f} s -> {mark(goals['layers_48_total_lt_30s'])}" if args.layers == 48
           else f"not measured (ran {args.layers} layers: {layers_total_s:.2f} s) -> n/a"),
    ]
    load_end = load_average()
    goal_lines.append(
        f"load average (1 min) at start / end: {info.get('loadavg_1m')} / {load_end} on {info['cores']} cores "
        "(a load above the thread count means other work shared the CPU during the timings)"
    )
    for line in goal_lines:
        print(f"goal: {line}" if not line.startswith("load") else line)

    payload = {
        "benchmark": SECTION,
        "command": command,
        "machine": info,
        "config": {
            "hidden": HIDDEN, "heads": HEADS, "head_dim": HEAD_DIM, "init_std": INIT_STD, "weights_dtype": "float32",
            "compute_dtype": args.dtype, "layers": args.layers, "seed": args.seed, "repeats": args.repeats,
            "naive_repeats": args.naive_repeats, "threads_flag": args.threads,
        },
        "comparison_layer": comparison,
        "one_layer": {"naive_s": naive_layer_s, "ours_s": ours_layer_s, "speedup": ratio},
        "layers": per_layer,
        "totals": {"layers": args.layers, "ours_total_s": layers_total_s, "worst_rel_err": worst_layer_rel},
        "goals": goals,
        "loadavg_1m_end": load_end,
    }
    json_path = write_json(args.json, payload)
    print(f"wrote {json_path}")

    if not args.no_md:
        md = "\n\n".join(
            [
                "## decompose_speed",
                f"Command: `{command}`",
                f"Machine: {machine_line(info)}",
                f"GPT-2-XL-shaped random attention (D={HIDDEN}, {HEADS} heads x {HEAD_DIM}, biases, weights "
                f"~ N(0, {INIT_STD}) in float32), compute dtype {args.dtype}. Naive = per-head full product + "
                f"`torch.linalg.svd` + top-{HEAD_DIM} truncation (fastest of {args.naive_repeats}); ours = "
                f"`clover.decompose.decompose` on all heads batched (median of {args.repeats}). Errors are max abs "
                "of the rebuilt product against the float64 product (relative: divided by its max abs).",
                markdown_table(cols, rows),
                markdown_table(cols2, rows2),
                "\n".join(f"- {line}" for line in goal_lines),
            ]
        )
        md_path = update_benchmarks_md(SECTION, md)
        print(f"updated {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
