"""MLA quality on SmolLM2-135M, training-free: every rotary lever of ``clover mla`` at KV 100% / 50% / 25% / 12.5%,
a TransMLA-recipe row on the same model, data, windows and cache size, and ``latent --rope latent`` (the quality
ceiling no engine runs).

    CLOVER_DATA=../shared/data python benchmarks/mla_quality.py [--windows 40] [--rows NAME,...]
    python benchmarks/mla_quality.py --render benchmarks/results/mla_quality.json

Perplexity: WikiText-2 test, ``--windows`` x 512. Calibration: 16 WikiText-2 validation windows of 512 tokens (the
last 4 choose the key/value split where it is searched). KV 100% keeps every latent dim, so the only error left is
the rotation the format cannot hold; KV 12.5% (48 cached numbers per token) is below one full rotated key (64), so
every MLA row there keeps 16 rotated dims (every 4th frequency) and a 32-dim latent. Levers (``MlaConfig``):

- rope key: which component of each frequency is shared and rotated (``pca``: the keys' own principal
  components, TransMLA's RoRoPE; ``query``: weighted by the query energy reading each KV head; ``attention``: also
  by the attention each key position receives);
- unrotated: what the other components keep (``nope``: nothing; ``expected``: the rotation's attention-weighted
  mean folded into the queries; ``refit``: least squares to the original scores);
- rotated dims: 32 instead of 64 (every other frequency rotated), leaving the latent 32 more dims;
- O refit: each head's O block refit to the latent's values on attention-mixed inputs (as ``latent`` does);
- TransMLA recipe: RoRoPE (``pca``), NoPE, and the BKV joint latent (plain PCA of keys and values on calibration
  inputs, key energy balanced to the values'), as described in its paper, without and with FreqFold (4
  neighbouring frequencies sharing one PCA; not at KV 12.5%, whose 16 rotated dims it cannot fold into).

Writes ``benchmarks/results/mla_quality.json`` and the ``mla_quality`` section of BENCHMARKS.md; the goals are
checked and printed, met or not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, machine_info, machine_line, markdown_table, print_table, smollm2_calibrated, \
    update_benchmarks_md, write_json  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "mla_quality.json"
KEPT = (1.0, 0.5, 0.25, 0.125)
LEVERS = {  # name -> MlaConfig fields
    "rope key pca, nope": dict(rope_key="pca", unrotated="nope"),
    "rope key query, nope": dict(rope_key="query", unrotated="nope"),
    "rope key attention, nope": dict(rope_key="attention", unrotated="nope"),
    "rope key query, expected": dict(rope_key="query", unrotated="expected"),
    "rope key query, refit": dict(rope_key="query", unrotated="refit"),
    "rope key query, refit, 32 rotated dims": dict(rope_key="query", unrotated="refit", rope_dims=32),
    "rope key query, refit, O refit": dict(rope_key="query", unrotated="refit", o_refit=True),
    "TransMLA recipe (RoRoPE + NoPE + BKV)": dict(rope_key="pca", unrotated="nope", latent_weights="bkv",
                                                 split=1.0),
    "TransMLA recipe + FreqFold 4": dict(rope_key="pca", unrotated="nope", latent_weights="bkv", split=1.0,
                                         freqfold=4),
}
LATENT = "latent --rope latent (no engine runs it)"
# the levers at full rank, KV 50% and 25%; KV 12.5% for the strongest and the peer; the run's length (about four
# minutes a row on two cores) keeps the rest to the sizes that decide
SIZES = {name: (1.0, 0.5, 0.25) for name in LEVERS}
SIZES.update({"rope key attention, nope": (1.0,), "rope key query, expected": (1.0, 0.5), "rope key query, refit": KEPT,
              "rope key query, refit, 32 rotated dims": (0.25,), "rope key query, refit, O refit": (0.5, 0.25),
              "TransMLA recipe (RoRoPE + NoPE + BKV)": KEPT, "TransMLA recipe + FreqFold 4": (0.5, 0.25),
              LATENT: (0.5, 0.25)})


def convert(name: str, kept: float, lm, calib):
    from clover.latent import LatentConfig, to_latent
    from clover.mla import MlaConfig, to_mla

    if name == LATENT:
        return to_latent(lm.model, LatentConfig(kv_ratio=1 - kept, calibration=calib, progress=False))
    fields = dict(LEVERS[name])
    if kept * 2 * 3 * 64 <= fields.get("rope_dims", 64):  # below one full rotated key: partial RoPE
        fields["rope_dims"] = 16
    return to_mla(lm.model, MlaConfig(kv_ratio=1 - kept, calibration=calib, progress=False, **fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rows", default=None, help="Only these rows (names separated by ;) at --kept, adding to "
                        "the saved run's other rows.")
    parser.add_argument("--kept", default=None, help="Fractions of the cache kept (comma-separated); default: each "
                        "row's sizes (SIZES)")
    parser.add_argument("--render", type=Path, default=None)
    args = parser.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()))
        return

    from clover.data import load_text
    from clover.evaluate import perplexity

    info = machine_info()
    lm, calib = smollm2_calibrated()
    text = load_text(split="test")

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, text, seqlen=512, max_windows=args.windows, progress=False).ppl

    names = list(LEVERS) + [LATENT]
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(";")]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}: use {names}")
        names = wanted
    kept_list = [float(k) for k in args.kept.split(",")] if args.kept else None
    rows = []
    runs = [info]
    command = "python benchmarks/mla_quality.py " + shlex.join(sys.argv[1:])
    commands = [command]
    saved = json.loads(RESULTS.read_text()) if args.rows and RESULTS.is_file() else None
    if saved and saved["windows"] == args.windows:
        rows = [r for r in saved["rows"] if not (r["name"] in names and r["kept"] in (kept_list or SIZES[r["name"]]))]
        runs = saved["runs"] + [info]
        commands = saved.get("commands", []) + [command] if saved.get("commands") else []
    base = ppl(lm.model)
    for name in names:
        for kept in kept_list or SIZES[name]:
            if name == LATENT and kept == 1.0:
                continue
            start = time.perf_counter()
            model, report = convert(name, kept, lm, calib)
            seconds = time.perf_counter() - start
            row = {"name": name, "kept": kept, "ppl": ppl(model), "seconds": round(seconds, 1),
                   "kv_bytes_per_token": report.kv_bytes_per_token_after, "run": len(runs) - 1}
            if name != LATENT:
                row.update(split=report.split, kv_lora_rank=report.kv_lora_rank,
                           rope_dims=report.qk_rope_head_dim,
                           rope_energy=sum(layer.rope_energy for layer in report.layers) / len(report.layers),
                           check=report.check["relative_diff"])
            rows.append(row)
            del model
            print(row, flush=True)
            payload = {"runs": runs, "windows": args.windows, "base_ppl": base, "rows": rows, "command": command,
                       "commands": commands}
            write_json(RESULTS, payload)
    render(payload)


def goals_of(payload: dict) -> list[str]:
    base = payload["base_ppl"]
    rows = payload["rows"]
    engine = [r for r in rows if r["name"] != LATENT]

    def best(kept: float, peer: bool = False):
        here = [r for r in engine if r["kept"] == kept and ("TransMLA" in r["name"]) == peer]
        return min(here, key=lambda r: r["ppl"]) if here else None

    lines = []
    for kept, limit in ((0.5, 1.25), (0.25, 1.6)):
        b = best(kept)
        if b:
            ratio = b["ppl"] / base
            lines.append(f"engine-ready KV {kept:.0%} <= {limit}x base ppl training-free: {ratio:.3f}x "
                         f"({b['name']}) -> {'MET' if ratio <= limit else 'NOT MET'}")
    for kept in KEPT:
        b = best(kept)
        t = best(kept, peer=True)
        if b and t:
            lines.append(f"KV {kept:.1%}: best clover lever {b['ppl']:.2f} ({b['name']}) vs the best TransMLA-recipe "
                         f"row {t['ppl']:.2f} ({t['name']}) -> {'ahead' if b['ppl'] < t['ppl'] else 'NOT ahead'}")
    return lines


def render(payload: dict) -> None:
    kept = sorted({r["kept"] for r in payload["rows"]}, reverse=True)
    names = list(dict.fromkeys(r["name"] for r in payload["rows"]))
    base = payload["base_ppl"]
    columns = ["conversion"] + [f"ppl @ KV {k:.1%}" for k in kept] + [f"x base @ KV {k:.1%}" for k in kept] + \
        ["rotated key keeps (mean, KV 100%)"]
    table = []
    for name in names:
        got = {r["kept"]: r for r in payload["rows"] if r["name"] == name}
        energy = got.get(1.0, {}).get("rope_energy")
        table.append([name] + [f"{got[k]['ppl']:.2f}" if k in got else "-" for k in kept]
                     + [f"{got[k]['ppl'] / base:.3f}" if k in got else "-" for k in kept]
                     + [f"{energy:.3f}" if energy is not None else "-"])
    title = (f"SmolLM2-135M MLA conversions, training-free: WikiText-2 test ppl ({payload['windows']} x 512; base "
             f"{base:.2f})")
    print_table(title, columns, table)
    goals = goals_of(payload)
    for line in goals:
        print("goal:", line)
    machines = "; ".join(f"run {i}: {machine_line(m)}" for i, m in enumerate(payload["runs"]))
    commands = "; ".join(f"run {i}: `{c}`" for i, c in enumerate(payload.get("commands", []))) or \
        f"`{payload['command']}` (the last run; each row names its run in the JSON)"
    md = (f"Command: {commands}\n\nMachine: {machines}\n\n{title}. Calibration: 16 x 512 validation "
          "tokens. KV 12.5% rows keep 16 rotated dims (a 32-dim latent). The TransMLA recipe rows are RoRoPE + "
          "NoPE + BKV (+ FreqFold) re-implemented from the paper's description.\n\n" + markdown_table(columns, table)
          + "\n\nGoals:\n\n" + "\n".join(f"- {line}" for line in goals))
    update_benchmarks_md("mla_quality", md)


if __name__ == "__main__":
    main()
