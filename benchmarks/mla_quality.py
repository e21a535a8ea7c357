"""MLA quality on SmolLM2-135M, training-free: every rotary lever of ``clover mla`` at KV 100% / 50% / 25% / 12.5%,
a TransMLA-recipe row on the same model, data, windows and cache size, and ``latent --rope latent`` (the quality
ceiling no engine runs).

    CLOVER_DATA=../shared/data python benchmarks/mla_quality.py [--windows 40] [--rows NAME;...] [--missing]
    python benchmarks/mla_quality.py --render benchmarks/results/mla_quality.json

Perplexity: WikiText-2 test, ``--windows`` x 512. Calibration: 16 WikiText-2 validation windows of 512 tokens (the
last 4 choose the key/value split where it is searched). KV 100% keeps every latent dim, so the only error left is
the rotation the format cannot hold; KV 12.5% (48 cached numbers per token) is below one full rotated key (64), so
every MLA row there keeps 16 rotated dims (every 4th frequency) and a 32-dim latent (the 32-rotated-dims row: 32 and
16). Levers (``MlaConfig``):

- rope key: which component of each frequency is shared and rotated (``pca``: the keys' own principal
  components, TransMLA's RoRoPE; ``query``: weighted by the query energy reading each KV head; ``attention``: also
  by the attention each key position receives);
- unrotated: what the other components keep (``nope``: nothing; ``expected``: the rotation's attention-weighted
  mean folded into the queries; ``refit``: least squares to the original scores);
- rotated dims: 32 instead of 64 (every other frequency rotated), leaving the latent 32 more dims; or 16 to 48
  rotated dims of the fastest frequencies (``rope_frequencies="fastest"``: the engine's theta raised to
  ``rope_dims / 64`` turns them exactly), the slow ones, which barely turn within a window, refit unrotated with
  the rest; rows that do not name their frequencies keep every (64 / rotated dims)-th one (``spread``), as KV 12.5%
  does for them;
- O refit: each head's O block refit to the latent's values on attention-mixed inputs (as ``latent`` does);
- mixed values: the joint latent prices value errors by the attention-mixed inputs O reads, keys still by the
  attention input (``value_moment="mixed"``, ``lowrank.joint_lowrank``); at KV 25% only, on the best row;
- 64 / 128 calibration windows: the best KV 25% row calibrated on that many validation windows instead of 16 (the
  last 4 still choose the split);
- per-layer split: each layer's key/value split chosen on the 4 held-out windows, one layer at a time, from the one
  best split (``split="layer"``; "grid to 64": the grid of splits tried widened from 0.25..16 to 0.25..64, since
  most late layers chose its top); at KV 25% on the best row, and on the best rows of KV 50% and 12.5%;
- layer-wise refit: after the solve, each converted attention block tuned on its own by Adam (``LOCAL_STEPS``
  steps) toward the original block's output on the calibration windows, kept where the 4 held-out windows improve
  (``local_steps``, ``mla/local.py``): no labels and no pass through the rest of the model, the calibration text
  priced at the block's output instead of in closed form; at KV 25% on the 32-rotated-dims row and the best row;
  "on converted inputs": the blocks refit first to last, each reading what the converted model feeds it (the blocks
  before it converted and refit), still toward the original block's output (``local_inputs="converted"``);
  "residual target": the same, toward the original block's output plus the original residual stream's difference
  from the converted one where the layer begins, so each block also makes up the error in what it adds to
  (``local_inputs="residual"``), on the 32-rotated-dims row beside its converted-inputs row; "400 steps": twice
  ``LOCAL_STEPS`` (the lr decays over the longer run), on the best row;
- TransMLA recipe: RoRoPE (``pca``), NoPE, and the BKV joint latent (plain PCA of keys and values on calibration
  inputs, key energy balanced to the values'), as described in its paper, without and with FreqFold (4
  neighbouring frequencies sharing one PCA; not at KV 12.5%, whose 16 rotated dims it cannot fold into).

Healing (``--heal``): the KV 25% conversion with the strongest lever, tuned toward the original by KL distillation
of its next-token distribution on WikiText-2 validation windows (``clover heal``): CLOVER, LoRA and PiSSA at
matched trainable parameters, the same steps, data and learning rate, over seeds; the control is the original model
tuned the same way toward itself (its objective starts at zero, so it shows what tuning alone does to the test
perplexity; it tunes the original, so it serves every conversion; it trains the original's own targets, k, vo and
up, whatever ``--heal-targets`` says, since the original has no shared rotated key). ``--heal-lever`` heals another
row's KV 25% conversion beside the comparison; ``--heal-targets`` trains other targets (``rope``: the rotated query
rows, which only LoRA / PiSSA reached before; the peers' rank is matched again) and ``--heal-warmup`` warms the
learning rate up, both reported beside the comparison; ``--no-heal-controls`` skips the controls (a peer at another
lr). A peer that leaves the model worse than the training-free conversion gets no verdict. ``--heal-lr-scales up=0.5``
scales one target's lr (``finetune.lr_scales``; LoRA / PiSSA scale the modules it adapts; ``lora:up=2`` one
method's only): part of the lr, so it joins the lr sweep rather than making a budget of its own; so does
``--heal-adam-eps 1e-3,3e-3`` (Adam's epsilon, each value its own run on one conversion), and
``--heal-core-scale spectrum`` (CLOVER's cores stepping strong directions more, ``finetune.modules._scaled_start``;
peers in the same run are unaffected). Each method's lr (and scales, epsilon, core scale) for a verdict is the one
with the lowest late held-out KL at seed 0 (``late_heldout_loss``: validation windows each scored before the step
that trains on them), where every lr tried recorded it; rows from before it was recorded fall back to the lowest
mean test ppl over 2 or more seeds. Where CLOVER ran at both core scales, each at its own best lr is read against
the other over seeds (``core_scale_findings``). A verdict reads the difference of seed means against 2 SE with at least
``VERDICT_SEEDS`` (3) seeds a side; a comparison with fewer prints its figures and no verdict. Runs already in the
JSON with the same settings are kept, so an interrupted ``--heal`` resumes.

Reach (``--heal-reach``): why a peer heals better. A CLOVER core moves its product only inside the span of its
frozen factors; LoRA's update is rank-limited but may leave those spans. Each peer run is healed as above, then
CLOVER's cores on the same conversion are fitted to the healed weights (``finetune.reach.project_``, weighted by the
inputs' second moments on the calibration windows, and plain): the fitted model's ppl says how much of the peer's
gain CLOVER's cores could hold, and the share of the change out of reach where the rest lies. Every model is also
scored by its KL from the original on the test windows (``heal.mean_kl``; the plain fit by ppl only), the measure
on which LoRA leads, and ``clover`` among the methods heals CLOVER the same way (no fit) as the reference. Rows go
to the JSON's ``reach`` list (resumable the same way; a row measured before the test KL is re-measured and
replaced).

Second metric (``--tasks``): lm-eval accuracy on a local next-sentence task built from WikiText-2 test paragraphs
(``clover.tasks.next_sentence_docs``: a context sentence, its true next sentence among three from other
paragraphs of the same article; the hub's task data is out of reach here), for the base model, the strongest lever
and the TransMLA recipe at KV 50% and 25%. Written to ``benchmarks/results/mla_quality_tasks.json`` (its own
file, so it can run beside ``--heal``), resumable the same way.

Writes ``benchmarks/results/mla_quality.json`` and the ``mla_quality`` section of BENCHMARKS.md; the goals are
checked and printed, met or not.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, machine_info, machine_line, markdown_table, print_table, smollm2_calibrated, \
    update_benchmarks_md, validation_windows, write_json  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "mla_quality.json"
TASK_RESULTS = REPO_ROOT / "benchmarks" / "results" / "mla_quality_tasks.json"
KEPT = (1.0, 0.5, 0.25, 0.125)


def fastest(dims: int) -> str:
    """The row of the strongest lever keeping ``dims`` rotated dims of the fastest frequencies."""
    return f"rope key query, refit, O refit, {dims} fastest rotated dims"


def fastest_fields(dims: int, **more) -> dict:
    """The ``MlaConfig`` fields of ``fastest(dims)``, and ``more`` for a row that adds one lever to it."""
    return dict(rope_key="query", unrotated="refit", rope_dims=dims, rope_frequencies="fastest", o_refit=True, **more)


LOCAL = ", layer-wise refit"  # the suffix of a row whose blocks were refit by Adam (read apart from closed-form rows)
LOCAL_STEPS = 200  # the layer-wise refit's Adam steps per block (MlaConfig's lr and batch)
CONVERTED = " on converted inputs"  # the refit's blocks read the converted model's inputs, first to last
RESIDUAL = ", residual target"  # ... and each block's target adds the residual stream's error at the layer's start
KV25_EXTRA = {  # one more lever on the best KV 25% row, where the goal is not met: row suffix -> fields added
    ", mixed values": dict(value_moment="mixed"),
    **{f", {n} calibration windows": dict(calib_windows=n) for n in (64, 128)},
    ", per-layer split": dict(split="layer"),
    ", 64 calibration windows, per-layer split": dict(calib_windows=64, split="layer"),
    ", per-layer split, grid to 64": dict(split="layer", split_grid=(0.25, 1.0, 4.0, 16.0, 64.0)),
    LOCAL: dict(local_steps=LOCAL_STEPS),
    ", 64 calibration windows, per-layer split" + LOCAL: dict(calib_windows=64, split="layer",
                                                                       local_steps=LOCAL_STEPS),
    LOCAL + CONVERTED: dict(local_steps=LOCAL_STEPS, local_inputs="converted"),
    LOCAL + CONVERTED + RESIDUAL: dict(local_steps=LOCAL_STEPS, local_inputs="residual"),
    ", 64 calibration windows, per-layer split" + LOCAL + CONVERTED + ", 400 steps": dict(
        calib_windows=64, split="layer", local_steps=2 * LOCAL_STEPS, local_inputs="converted"),
}


PER_LAYER_SIZES = {48: (0.5,), 24: (0.125,)}  # the per-layer split on the best rows of the other cache sizes


LEVERS = {  # name -> MlaConfig fields, every lever spelled out (the config's defaults are the best levers found)
    "rope key pca, nope": dict(rope_key="pca", unrotated="nope", o_refit=False),
    "rope key query, nope": dict(rope_key="query", unrotated="nope", o_refit=False),
    "rope key attention, nope": dict(rope_key="attention", unrotated="nope", o_refit=False),
    "rope key query, expected": dict(rope_key="query", unrotated="expected", o_refit=False),
    "rope key query, refit": dict(rope_key="query", unrotated="refit", o_refit=False),
    "rope key query, refit, 32 rotated dims": dict(rope_key="query", unrotated="refit", rope_dims=32, o_refit=False),
    "rope key query, refit, O refit": dict(rope_key="query", unrotated="refit", o_refit=True),
    **{fastest(dims): fastest_fields(dims) for dims in (48, 40, 32, 24, 16)},
    **{fastest(32) + suffix: fastest_fields(32, **more) for suffix, more in KV25_EXTRA.items()},
    **{fastest(dims) + ", per-layer split": fastest_fields(dims, split="layer") for dims in PER_LAYER_SIZES},
    "TransMLA recipe (RoRoPE + NoPE + BKV)": dict(rope_key="pca", unrotated="nope", latent_weights="bkv",
                                                 split=1.0, o_refit=False),
    "TransMLA recipe + FreqFold 4": dict(rope_key="pca", unrotated="nope", latent_weights="bkv", split=1.0,
                                         freqfold=4, o_refit=False),
}
LATENT = "latent --rope latent (no engine runs it)"
HEAL_LEVER, HEAL_KEPT = "rope key query, refit, O refit", 0.25  # the comparison's conversion (a row may name another)
AS_SOLVED = " (pairs as solved, before balancing)"  # how a conversion is named for rows run before balance_pairs
HEAL_METHODS, HEAL_SEEDS, CONTROL_SEEDS = ("clover", "lora", "pissa"), (0, 1, 2), (0, 1, 2)
SWEEP_SEED = 0  # an lr sweep runs this seed; the lr it picks (by the late held-out KL) then runs every seed
HEALED_GOAL = 1.10  # the healed KV 25% goal: at most this ratio to the base
VERDICT_SEEDS = 3  # a verdict reads 2 SE over at least this many seeds a side (the 3): fewer shows figures
HEAL = dict(steps=40, lr=1e-3, batch_size=2, seqlen=256)  # 20K tokens of validation text per run
HEAL_TARGETS = "qk,vo,up"  # what the comparison trains; a run with others records them in its settings
SHARP_ETAS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)  # first-step sizes the sharpness probe tries (--heal-sharpness)
# every lever at every size, but for two that cannot be: FreqFold has no 4 neighbours to fold among KV 12.5%'s 16
# rotated dims, and the latent keeping all of its dims is the original model
SIZES = {name: KEPT for name in LEVERS}
SIZES.update({"TransMLA recipe + FreqFold 4": (1.0, 0.5, 0.25), LATENT: (0.5, 0.25, 0.125),
              # the rotated-dims sweep where the latent is short (KV 25% and 12.5%); 32, its best at KV 25%, at
              # every size; a KV 12.5% cache (48 numbers) has no room for a latent beside 40 or 48 rotated dims
              fastest(48): (0.5, 0.25), fastest(40): (0.25,), fastest(24): (0.25, 0.125),
              fastest(16): (0.25, 0.125), **{fastest(32) + suffix: (0.25,) for suffix in KV25_EXTRA},
              **{fastest(dims) + ", per-layer split": kept for dims, kept in PER_LAYER_SIZES.items()}})
BASE = "base (SmolLM2-135M)"
# the local task, built from test rows: 300 documents x 4 choices of ~60 tokens is ~4 minutes a model on 2 cores
TASK = dict(name="wikitext2_next_sentence", docs=300, choices=4, context=1, max_words=30, seed=0)
TASK_ROWS, TASK_KEPT = ("rope key query, refit, O refit", "TransMLA recipe (RoRoPE + NoPE + BKV)"), (0.5, 0.25)
TASK_PLAN = [(BASE, 1.0)] + [(name, kept) for kept in TASK_KEPT for name in TASK_ROWS]  # (row, KV kept), in order


def section(title: str, text: str, columns: list[str], table: list[list[str]]) -> str:
    """A table printed to the terminal, and returned as BENCHMARKS.md markdown under its title and ``text``."""
    print_table(title, columns, table)
    return f"\n\n{title}. {text}\n\n" + markdown_table(columns, table)


def separation(gap: float, se: float) -> str:
    """A difference (positive: ours better) read against its standard error: a verdict only beyond 2 SE."""
    return "ahead" if gap > 2 * se else ("behind" if -gap > 2 * se else "not separated")


def lever_calibration(name: str, lm, calib):
    """The windows row ``name`` calibrates on: the benchmark's own (``calib``), or as many validation windows of the
    same length as the lever asks for. Read here, apart from ``convert``, so that a cached conversion's key hashes
    exactly the windows it was made from."""
    windows = LEVERS.get(name, {}).get("calib_windows")
    return validation_windows(lm.tokenizer, windows, calib.shape[1]) if windows else calib


def convert(name: str, kept: float, lm, calib):
    """Row ``name`` at ``kept`` of the cache, calibrated on ``calib``: the lever's own windows (``lever_calibration``),
    so every caller passes what the conversion reads."""
    from clover.latent import LatentConfig, to_latent
    from clover.mla import MlaConfig, to_mla

    if name == LATENT:
        return to_latent(lm.model, LatentConfig(kv_ratio=1 - kept, calibration=calib, progress=False))
    fields = {key: value for key, value in LEVERS[name].items() if key != "calib_windows"}
    fields.setdefault("rope_frequencies", "spread")  # what the rows measured before the choice existed keep
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
    parser.add_argument("--missing", action="store_true", help="Only the rows and sizes (SIZES) the saved run does "
                        "not have yet, adding to it (a run cut short resumes).")
    parser.add_argument("--render", type=Path, default=None)
    parser.add_argument("--heal", action="store_true", help="Run the healing rows (and their controls) instead of "
                        "the training-free ones, adding to the saved run.")
    parser.add_argument("--heal-methods", default=",".join(HEAL_METHODS))
    parser.add_argument("--heal-seeds", default=",".join(str(s) for s in HEAL_SEEDS))
    parser.add_argument("--heal-steps", type=int, default=HEAL["steps"], help="Other than the default: a longer "
                        "run, reported beside the side-by-side comparison.")
    parser.add_argument("--heal-lr", default=str(HEAL["lr"]), help="Other than the default: a method at its own "
                        "learning rate, reported beside the comparison; several (comma-separated) run one after "
                        "another on one conversion; method=lr (lora=2e-3,pissa=1e-3) gives one method its own.")
    parser.add_argument("--heal-targets", default=HEAL_TARGETS, help="Other than the default (e.g. with rope, "
                        "the rotated query rows): CLOVER and, at the matched rank, LoRA / PiSSA train these; reported "
                        "beside the comparison. Its controls tune the original's own targets (k, vo, up: it has no "
                        "shared rotated key), with every other setting the same.")
    parser.add_argument("--heal-warmup", type=int, default=0, help="Warmup steps (linear), the same for every "
                        "method; other than 0: reported beside the comparison.")
    parser.add_argument("--heal-lr-scales", default="", help="Per-target lr multipliers, e.g. up=0.5 (LoRA / PiSSA "
                        "scale the modules the target adapts), reported beside the comparison; method:target=x "
                        "(clover:vo=0.25,lora:up=2) gives one method its own (LoRA / PiSSA refuse, when their run "
                        "starts, different scales for two targets that adapt one module: qk and vo share kv_b_proj).")
    parser.add_argument("--heal-adam-eps", default="", help="Adam's epsilon, or several (comma-separated, each its "
                        "own run on one conversion), the same for every method; part of the lr sweep.")
    parser.add_argument("--heal-core-scale", default="unit", help="CLOVER's core scale (finetune.modules."
                        "_scaled_start): spectrum steps strong directions more; part of CLOVER's lr sweep (the peers "
                        "in the same run keep theirs).")
    parser.add_argument("--no-heal-controls", action="store_true", help="Skip the controls: for a peer at another "
                        "learning rate, which only the CLOVER-vs-peer verdict reads.")
    parser.add_argument("--heal-lever", default=HEAL_LEVER, help="The KV 25%% conversion healed (a row name); "
                        "other than the default: reported beside the comparison, against the same controls.")
    parser.add_argument("--heal-reach", action="store_true", help="With --heal: heal each method; for the peers "
                        "(LoRA / PiSSA) then fit CLOVER's cores to the healed model (finetune.reach, plain and "
                        "weighted by the calibration inputs) and measure what they reach and what they leave out, by "
                        "test ppl and test KL from the original (clover: its own healing, the reference); adding to "
                        "the saved run's reach rows.")
    parser.add_argument("--heal-sharpness", action="store_true", help="With --heal / --heal-reach: first probe "
                        "CLOVER's cores on the conversion, one target at a time: the KL after one first Adam step of "
                        "each size in SHARP_ETAS (which target caps a shared lr), adding to the saved run.")
    parser.add_argument("--conversion-cache", type=Path, default=None, help="With --heal / --heal-reach: a folder "
                        "that keeps each healed conversion, keyed by everything it is made from (conversion_key), so "
                        "a later run with the same key loads it in seconds instead of converting again (the lever's "
                        "row in the JSON has how long that takes).")
    parser.add_argument("--tasks", action="store_true", help="Score the second metric (the local next-sentence task) "
                        "for the base, the strongest lever and the TransMLA recipe at KV 50%% and 25%% (TASK_PLAN), "
                        "adding to its own results file.")
    args = parser.parse_args()
    args.heal = args.heal or args.heal_reach  # reaching a peer's healing heals it first
    if args.heal_sharpness and not args.heal:
        print("error: --heal-sharpness probes the conversion a healing run heals: add --heal or --heal-reach",
              file=sys.stderr)
        sys.exit(2)
    if args.conversion_cache and (not args.heal or (args.conversion_cache.exists()
                                                    and not args.conversion_cache.is_dir())):
        print(f"error: --conversion-cache {args.conversion_cache} keeps the conversions healing starts from: pass a "
              "folder (not a file), with --heal or --heal-reach", file=sys.stderr)
        sys.exit(2)
    if args.render:
        render(json.loads(args.render.read_text()))
        return

    from clover.errors import CloverError

    try:  # every flag is checked before the model and the data load: one line, exit code 2
        names, kept_list = chosen_rows(args)
        plan = heal_plan(args) if args.heal else None
    except CloverError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    from clover.data import load_text
    from clover.evaluate import perplexity

    info = machine_info()
    info["command"] = "python benchmarks/mla_quality.py " + shlex.join(sys.argv[1:])
    lm, calib = smollm2_calibrated()
    if args.tasks:
        task_rows(lm, calib, info)
        render(json.loads(RESULTS.read_text()))
        return
    text = load_text(split="test")

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, text, seqlen=512, max_windows=args.windows, progress=False).ppl

    @functools.cache
    def test_windows():
        from clover.finetune.data import token_windows

        return token_windows(lm.tokenizer, [text], 512).windows[:args.windows]

    def kl(model) -> float:  # KL from the original on the same test windows as ppl (--heal-reach)
        from clover.heal import mean_kl

        return mean_kl(model, lm.model, test_windows())

    rows = []
    runs = [info]
    resume = args.rows or args.heal or args.missing
    saved = json.loads(RESULTS.read_text()) if resume and RESULTS.is_file() else None
    healed = []
    if saved and saved["windows"] == args.windows:
        keep_all = args.heal or args.missing  # neither re-measures a saved row
        rows = [r for r in saved["rows"] if keep_all
                or not (r["name"] in names and r["kept"] in (kept_list or SIZES[r["name"]]))]
        healed = saved.get("heal", [])
        runs = saved["runs"] + [info]
    base = ppl(lm.model)

    def save(reach: list | None = None) -> dict:
        """Everything measured so far, written after every row so that a cut run keeps it."""
        payload = {"runs": runs, "windows": args.windows, "base_ppl": base, "rows": rows, "heal": healed,
                   "reach": reach if reach is not None else (saved or {}).get("reach", []), "sharpness": sharp}
        write_json(RESULTS, payload)
        return payload

    sharp = (saved or {}).get("sharpness", [])
    conversions = Conversions(args.conversion_cache)  # one conversion serves every lr, epsilon and probe
    if plan and args.heal_sharpness:
        for method, grid in plan.grids():
            probe = {"lever": args.heal_lever, "targets": grid.get("targets", HEAL_TARGETS),
                     "core_scale": grid.get("core_scale", "unit")}
            if method != "clover" or any(all(r[k] == v for k, v in probe.items()) for r in sharp):
                continue
            sharp.append({**probe, "run": len(runs) - 1,
                          **first_step_sharpness(lm, conversions.start(args.heal_lever, lm, calib), grid)})
            print(sharp[-1], flush=True)
            save()
    if plan and args.heal_reach:
        reached = saved.get("reach", []) if saved else []
        for method, grid in plan.grids():
            for row, healing in reach_runs(lm, calib, ppl, kl, method, plan.seeds, reached, len(runs) - 1, grid,
                                           args.heal_lever, conversions):
                reached = with_reach_row(reached, row)
                if not any(same_run(healing, r) for r in healed):  # a seed healed before keeps its first row
                    healed.append(healing)
                print(row, flush=True)
                save(reach=reached)
        render(save(reach=reached))
        return
    if plan:
        for method, grid in plan.grids():
            for row in heal_runs(lm, calib, ppl, [method], plan.seeds, healed, len(runs) - 1, grid, args.heal_lever,
                                 controls=not args.no_heal_controls, conversions=conversions):
                healed.append(row)
                print(row, flush=True)
                save()
        render(save())
        return
    have = {(r["name"], r["kept"]) for r in rows}
    for name in names:
        for kept in kept_list or SIZES[name]:
            if (name == LATENT and kept == 1.0) or (args.missing and (name, kept) in have):
                continue
            start = time.perf_counter()
            model, report = convert(name, kept, lm, lever_calibration(name, lm, calib))
            seconds = time.perf_counter() - start
            row = {"name": name, "kept": kept, "ppl": ppl(model), "seconds": round(seconds, 1),
                   "kv_bytes_per_token": report.kv_bytes_per_token_after, "run": len(runs) - 1}
            if name != LATENT:
                row.update(split=report.split, kv_lora_rank=report.kv_lora_rank,
                           rope_dims=report.qk_rope_head_dim,
                           rope_energy=sum(layer.rope_energy for layer in report.layers) / len(report.layers),
                           check=report.check["relative_diff"])
                if "layer" in report.split_losses:  # the held-out losses and each layer's choice
                    row.update(split_losses=report.split_losses, layer_splits=[lr.split for lr in report.layers])
            rows.append(row)
            del model
            print(row, flush=True)
            save()
    render(save())


def chosen_rows(args) -> tuple[list[str], list[float] | None]:
    """The training-free rows (``--rows``) and cache sizes (``--kept``) a run measures; None: each row's SIZES.
    Bad input raises ``CloverError``."""
    from clover.errors import CloverError

    names = list(LEVERS) + [LATENT]
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(";")]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise CloverError(f"unknown rows {unknown}: use names from {names}")
        names = wanted
    if not args.kept:
        return names, None
    try:
        kept_list = [float(k) for k in args.kept.split(",")]
    except ValueError:
        raise CloverError(f"--kept {args.kept!r} is not a list of fractions: use e.g. 0.5,0.25") from None
    if not all(0 < k <= 1 for k in kept_list):
        raise CloverError(f"--kept {args.kept!r}: each fraction of the cache kept must be in (0, 1]")
    return names, kept_list


@dataclass
class HealPlan:
    """What ``--heal`` runs, from its flags: the methods at their learning rates, the seeds, and the settings every
    run shares (a row's identity in the JSON)."""

    seeds: list[int]
    settings: dict
    lrs: dict[float, list[str]]  # lr -> the methods run at it, in order
    epsilons: list[float | None]
    core_scale: dict  # CLOVER's only: the peers have no cores to scale
    lr_scales: dict[str, dict]  # method -> its per-target lr multipliers (none: one rate)

    def grids(self):
        """Each (method, settings) run, in order: every epsilon of one lr before the next lr."""
        for lr, at_lr in self.lrs.items():
            for eps, method in itertools.product(self.epsilons, at_lr):
                scales = self.lr_scales.get(method)
                yield method, dict(self.settings, lr=lr, **({} if eps is None else {"adam_eps": eps}),
                                   **({"lr_scales": scales} if scales else {}),
                                   **(self.core_scale if method == "clover" else {}))


def heal_plan(args) -> HealPlan:
    """The ``--heal`` flags read and checked, each healing config the run will build included (``HealConfig.check``),
    so a bad flag stops the run (``CloverError``) before the model loads rather than after the conversion, which
    takes longer than a healing run's first steps."""
    from clover.errors import CloverError

    methods = [m.strip() for m in args.heal_methods.split(",") if m.strip()]
    try:
        seeds = [int(x) for x in args.heal_seeds.split(",") if x.strip()]
        epsilons = [float(x) for x in args.heal_adam_eps.split(",") if x.strip()] or [None]
    except ValueError:
        raise CloverError(f"--heal-seeds {args.heal_seeds!r} / --heal-adam-eps {args.heal_adam_eps!r}: use "
                          "comma-separated integers / numbers") from None
    if not methods or not seeds:
        raise CloverError("--heal-methods and --heal-seeds each need at least one entry")
    settings = dict(HEAL, steps=args.heal_steps)
    if args.heal_targets != HEAL_TARGETS:
        settings["targets"] = args.heal_targets
    if args.heal_warmup:
        settings["warmup_steps"] = args.heal_warmup
    core_scale = {} if args.heal_core_scale == "unit" else {"core_scale": args.heal_core_scale}
    if core_scale and "clover" not in methods:
        raise CloverError("--heal-core-scale scales CLOVER's cores: run it with clover among --heal-methods")
    if args.heal_sharpness and "clover" not in methods:
        raise CloverError("--heal-sharpness probes CLOVER's cores: run it with clover among --heal-methods")
    if args.heal_lever not in LEVERS:
        raise CloverError(f"unknown --heal-lever {args.heal_lever!r}: use one of {list(LEVERS)}")
    plan = HealPlan(seeds, settings, methods_at_lr(args.heal_lr, methods), epsilons, core_scale,
                    lr_scales_by_method(args.heal_lr_scales, methods))
    for method, grid in plan.grids():
        heal_config(method, grid, seeds[0], grid.get("targets", HEAL_TARGETS)).check()
    return plan


def heal_config(method: str, settings: dict, seed: int, targets: str):
    """The ``HealConfig`` of one healing run: ``settings`` as the JSON records them, ``targets`` comma-separated."""
    from clover.heal import HealConfig

    run_settings = {key: value for key, value in settings.items() if key != "targets"}
    return HealConfig(method=method, targets=tuple(targets.split(",")), seed=seed, progress=False, **run_settings)


def task_rows(lm, calib, info) -> None:
    """The second metric: the local task scored by the harness for the base and TASK_ROWS at TASK_KEPT, skipping
    what the task results already hold (same task); written after every row."""
    import tempfile

    from clover.data import load_rows
    from clover.tasks import TaskConfig, evaluate_tasks, next_sentence_docs, write_choice_task

    saved = json.loads(TASK_RESULTS.read_text()) if TASK_RESULTS.is_file() else None
    payload = saved if saved and saved["task"] == TASK else {"task": TASK, "runs": [], "rows": []}
    payload["runs"].append(info)
    have = {(r["name"], r["kept"]) for r in payload["rows"]}
    docs = next_sentence_docs(load_rows(split="test"), TASK["docs"], TASK["choices"], TASK["seed"], TASK["context"],
                              (5, TASK["max_words"]))
    with tempfile.TemporaryDirectory() as folder:
        write_choice_task(folder, TASK["name"], docs, prompt="{{question}}")
        config = TaskConfig(tasks=[TASK["name"]], task_dir=folder, batch_size=8, progress=False)
        for name, kept in TASK_PLAN:
            if (name, kept) in have:
                continue
            model = lm.model if name == BASE else convert(name, kept, lm, lever_calibration(name, lm, calib))[0]
            score = evaluate_tasks(model, lm.tokenizer, config).score(TASK["name"])
            row = {"name": name, "kept": kept, "acc": score.acc, "acc_stderr": score.acc_stderr,
                   "acc_norm": score.acc_norm, "acc_norm_stderr": score.acc_norm_stderr,
                   "documents": score.documents, "run": len(payload["runs"]) - 1}
            payload["rows"].append(row)
            print(row, flush=True)
            write_json(TASK_RESULTS, payload)
            del model


def render_tasks() -> tuple[str, list[str]]:
    """The second metric's table (acc_norm +- the harness's stderr, acc beside it) and, per size, the strongest
    lever against the TransMLA recipe: ahead only beyond 2 SE."""
    if not TASK_RESULTS.is_file():
        return "", []
    payload = json.loads(TASK_RESULTS.read_text())
    got = {(r["name"], r["kept"]): r for r in payload["rows"]}
    columns = ["model", "KV cache", "acc_norm +- stderr", "acc +- stderr"]
    table = []
    for name, kept in TASK_PLAN:
        row = got.get((name, kept))
        if row:
            table.append([name, f"{kept:.0%}", f"{row['acc_norm']:.3f} +- {row['acc_norm_stderr']:.3f}",
                          f"{row['acc']:.3f} +- {row['acc_stderr']:.3f}"])
    task = payload["task"]
    title = (f"Second metric: lm-eval accuracy on a local next-sentence task ({task['docs']} documents from WikiText-2 "
             f"test, {task['choices']} choices, seed {task['seed']}; chance {1 / task['choices']:.2f})")
    lines = []
    for kept in TASK_KEPT:
        mine, peer = got.get((TASK_ROWS[0], kept)), got.get((TASK_ROWS[1], kept))
        if mine and peer:
            gap = mine["acc_norm"] - peer["acc_norm"]
            se = math.sqrt(mine["acc_norm_stderr"] ** 2 + peer["acc_norm_stderr"] ** 2)
            lines.append(f"KV {kept:.1%}: {TASK_ROWS[0]} acc_norm {mine['acc_norm']:.3f} vs the "
                         f"TransMLA recipe {peer['acc_norm']:.3f}, difference {gap:+.3f}, 2 SE {2 * se:.3f} -> "
                         f"{separation(gap, se)}")
    machines = "; ".join(f"run {i}: {machine_line(m)}, `{m['command']}`" for i, m in enumerate(payload["runs"]))
    return section(title, "acc_norm (per-byte log-likelihood, the fair one when choices differ in length) +- the "
                   "harness's standard error; the context is one sentence of a paragraph, the choices its true next "
                   "sentence and three from other paragraphs of the same article, 5 to 30 words each "
                   f"(`clover.tasks.next_sentence_docs`). Machine and command: {machines}.", columns, table), lines


def methods_at_lr(spec: str, methods: list[str]) -> dict[float, list[str]]:
    """``--heal-lr``: each lr and the methods run at it, in order. A plain value (``1e-3,2e-3``) serves every
    method; ``lora=2e-3,pissa=1e-3`` gives each method its own, so peers at their own best lr share one
    conversion (the slow part) in one run. Bad input raises ``CloverError``."""
    from clover.errors import CloverError

    plan: dict[float, list[str]] = {}
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        method, _, value = entry.rpartition("=")
        if method and method not in methods:
            raise CloverError(f"--heal-lr names {method!r}, which --heal-methods does not run: use one of {methods}")
        try:
            lr = float(value)
        except ValueError:
            raise CloverError(f"--heal-lr {value!r} is not a number: use e.g. 1e-3 or lora=2e-3") from None
        for m in [method] if method else methods:
            plan.setdefault(lr, []).append(m)
    return plan


def lr_scales_by_method(spec: str, methods: list[str]) -> dict[str, dict]:
    """``--heal-lr-scales``: each method's per-target lr multipliers. ``vo=0.25`` serves every method;
    ``clover:vo=0.25,lora:up=2`` gives each method its own (LoRA's ``kv_b_proj`` serves both Q-K and V-O, so it cannot
    take CLOVER's V-O split), so both picks share one conversion in one run; a method's own entry overrides a
    shared one for the same target. Bad input raises ``CloverError``."""
    from clover.errors import CloverError
    from clover.finetune.lr_scales import parse_lr_scales

    shared, own = [], {method: [] for method in methods}
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        method, _, scale = entry.rpartition(":")
        if method and method not in methods:
            raise CloverError(f"--heal-lr-scales names {method!r}, which --heal-methods does not run: use one of "
                              f"{methods}")
        (own[method] if method else shared).append(scale)
    common = dict(parse_lr_scales(",".join(shared)))
    merged = {method: common | dict(parse_lr_scales(",".join(own[method]))) for method in methods}
    return {method: dict(sorted(scales.items())) for method, scales in merged.items()}  # one order, one label


@dataclass
class Conversions:
    """The KV 25% conversions healing starts from, each made once per run (the slow step: its time is the lever's
    row in the JSON) and shared by every lr, epsilon, seed and probe. With ``cache`` (``--conversion-cache``) each is
    also saved there under its ``conversion_key``, and a later run with the same key loads it instead of converting
    again."""

    cache: Path | None = None
    made: dict = field(default_factory=dict)

    def start(self, lever: str, lm, calib):
        if lever not in self.made:
            self.made[lever] = self._load_or_convert(lever, lm, calib)
        return self.made[lever]

    def _load_or_convert(self, lever: str, lm, calib):
        calib = lever_calibration(lever, lm, calib)  # read once: the key hashes what the conversion reads
        if self.cache is None:
            return convert(lever, HEAL_KEPT, lm, calib)[0]
        from clover.models import load
        from clover.save import save_model

        folder = self.cache / conversion_key(lever, lm, calib)
        if folder.is_dir():
            return load(str(folder)).model
        model, _ = convert(lever, HEAL_KEPT, lm, calib)
        save_model(model, None, folder)  # atomic: a cut run leaves no half-written entry
        return model


def conversion_key(lever: str, lm, calib) -> str:
    """A cached conversion's name: a hash of everything it is made from (the lever's fields and size, every weight of
    the original (``weights_digest``), the windows it calibrates on (``lever_calibration``: all of them, also those a
    lever reads beyond the benchmark's 16), the code that converts: the clover package and ``convert``, and the
    torch / transformers versions), so any change to them makes a new entry."""
    import hashlib
    import inspect

    import torch
    import transformers

    import clover
    from clover.finetune.train import weights_digest

    digest = hashlib.sha256(json.dumps([lever, LEVERS[lever], HEAL_KEPT, torch.__version__, transformers.__version__],
                                       sort_keys=True, default=str).encode())
    digest.update(inspect.getsource(convert).encode())
    digest.update(weights_digest(lm.model).encode())
    digest.update(calib.cpu().numpy().tobytes())
    package = Path(clover.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    return f"kv{round(HEAL_KEPT * 100)}-{digest.hexdigest()[:16]}"


def tune(lm, calib, windows, kind: str, method: str, seed: int, settings: dict, lever: str,
         conversions: Conversions):
    """One healing run (``kind`` "healed": the conversion of ``lever``, made once by ``conversions``) or control
    (the original toward itself): ``(tuned model, HealReport, seconds)``."""
    import copy
    import tempfile

    from clover.heal import distill, heal

    student = copy.deepcopy(conversions.start(lever, lm, calib) if kind == "healed" else lm.model)
    targets = settings.get("targets", HEAL_TARGETS) if kind == "healed" else "k,vo,up"  # the original: rotary
    config = heal_config(method, settings, seed, targets)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        tuned, report = (heal if kind == "healed" else distill)(student, lm.model, lm.tokenizer, windows, config,
                                                                folder, log=lambda *_: None)
        return tuned, report, time.perf_counter() - start


def healing_windows(lm, settings: dict):
    from clover.data import load_rows
    from clover.finetune.data import token_windows

    return token_windows(lm.tokenizer, ["\n\n".join(load_rows(split="validation"))], settings["seqlen"])


def heal_runs(lm, calib, ppl, methods, seeds, done, run, settings, lever=HEAL_LEVER, controls=True, *,
              conversions: Conversions):
    """Healed conversions of ``lever`` and (``controls``) controls not yet in ``done`` (same settings; a control
    tunes the original, so it serves every lever): one row per method, seed and kind. ``conversions`` keeps the
    conversion for the next call (another epsilon heals the same one)."""
    windows = healing_windows(lm, settings)
    have = {(r["kind"], r["method"], r["seed"]) for r in done if in_group(r, settings, lever)}
    plan = [("healed", m, s) for m in methods for s in seeds] + \
        [("control", m, s) for m in methods for s in CONTROL_SEEDS if s in seeds and controls]
    for kind, method, seed in plan:
        if (kind, method, seed) in have:
            continue
        tuned, report, seconds = tune(lm, calib, windows, kind, method, seed, settings, lever, conversions)
        yield healing_row(kind, method, seed, ppl(tuned), report, seconds, settings, run, lever)
        del tuned


def healing_row(kind, method, seed, test_ppl, report, seconds, settings, run, lever) -> dict:
    """One row of the healing table (``payload["heal"]``): a healed conversion of ``lever`` or a control."""
    row = {"kind": kind, "method": method, "seed": seed, "ppl": test_ppl, "trainable": report.trainable,
           "lora_r": report.lora_r, "train_kl": report.train_kl, "heldout_kl": report.heldout_kl,
           "seconds": round(seconds, 1), "settings": dict(settings), "run": run}
    row["balanced"] = True  # every conversion now leaves its pairs in CLOVER's form (mla/deepseek.py)
    return row if kind == "control" or lever == HEAL_LEVER else {**row, "lever": lever}


def reach_runs(lm, calib, ppl, kl, method, seeds, done, run, settings, lever, conversions: Conversions):
    """Per seed not yet in ``done`` with a test KL: the method's healing of ``lever``, its test ppl and test KL
    (``kl``: KL from the original on the test windows, ``heal.mean_kl``), and, for a peer, CLOVER's cores fitted to
    it (``finetune.reach.project_``, weighted by the inputs' second moments on the calibration windows, and plain).
    CLOVER's own healing is measured the same way with no fit (its change is inside its cores' reach by
    construction, tests/test_reach.py): the reference the fits are read against. Per seed: (reach row, the same
    run as a row of the healing table), so a setting reached first also counts in the healing comparison."""
    import copy

    from clover.finetune.reach import input_moments, project_

    targets = settings.get("targets", HEAL_TARGETS)
    windows = healing_windows(lm, settings)
    have = {r["seed"] for r in done if r["method"] == method and r["settings"] == settings and r["lever"] == lever
            and "test_kl" in r}
    moments = start_kl = None
    for seed in seeds:
        if seed in have:
            continue
        tuned, report, seconds = tune(lm, calib, windows, "healed", method, seed, settings, lever, conversions)
        start = conversions.start(lever, lm, calib)
        row = {"method": method, "seed": seed, "settings": dict(settings), "lever": lever, "run": run,
               "lora_r": report.lora_r, "heldout_kl": report.heldout_kl, "seconds": round(seconds, 1),
               "ppl": ppl(tuned), "test_kl": kl(tuned)}
        if start_kl is None:  # the conversion's, the same for every seed
            start_kl = kl(start)
        row["test_kl_start"] = start_kl
        if method != "clover":
            if moments is None:  # what each side reads in the conversion, on the benchmark's calibration windows
                moments = input_moments(start, calib, targets)
            for fit, weights in (("weighted", moments), ("plain", None)):
                inside = copy.deepcopy(start)
                reach = project_(inside, tuned, targets, weights)
                row[f"ppl_inside_{fit}"], row[f"outside_{fit}"] = ppl(inside), reach.outside
                if fit == "weighted":  # the KL question is the best fit's; the plain fit keeps its ppl only
                    row["test_kl_inside_weighted"] = kl(inside)
                del inside
        yield row, healing_row("healed", method, seed, row["ppl"], report, seconds, settings, run, lever)
        del tuned


def first_step_sharpness(lm, start, settings: dict) -> dict:
    """How far one Adam step can move each CLOVER target of the conversion ``start``: the change in KL from the
    original on 8 calibration windows after the first step of each size in SHARP_ETAS (every core entry moved by
    the size against its gradient's sign, which is Adam's first update whatever the gradient's scale), one target's
    cores at a time and then all together, the gradient taken on 8 other windows. Why: one lr serves every target,
    so a target whose KL rises at a step the others still gain from caps the lr for all of them, and a per-target
    scale (``--heal-lr-scales``) frees the rest. Deterministic: no sampling, fixed windows."""
    import copy

    import torch

    from clover.finetune.attach import TuneConfig, attach
    from clover.heal.distill import kl_loss

    windows = healing_windows(lm, settings).windows
    grad_ids, eval_ids = windows[:8], windows[100:108]
    model = copy.deepcopy(start)
    attach(model, TuneConfig(targets=tuple(settings.get("targets", HEAL_TARGETS).split(",")),
                             core_scale=settings.get("core_scale", "unit"), progress=False))
    loss = kl_loss(lm.model)
    cores = {name: p for name, p in model.named_parameters() if p.requires_grad}
    loss(model, {"input_ids": grad_ids}).backward()
    signs = {name: p.grad.sign() for name, p in cores.items()}
    first = {name: p.detach().clone() for name, p in cores.items()}
    model.eval()

    def kl_after(names, eta: float) -> float:
        with torch.no_grad():
            for name in names:
                cores[name].copy_(first[name] - eta * signs[name])
            value = loss(model, {"input_ids": eval_ids}).item()
            for name in names:
                cores[name].copy_(first[name])
        return value

    by_target: dict[str, list[str]] = {}
    for name in cores:  # cores are named by their target: qk_core, vo_core, up_core, rope_core
        by_target.setdefault(name.rsplit(".", 1)[-1].removesuffix("_core"), []).append(name)
    by_target["all"] = list(cores)
    start_kl = kl_after([], 0.0)
    return {"start_kl": start_kl, "etas": list(SHARP_ETAS),
            "delta": {target: [kl_after(names, eta) - start_kl for eta in SHARP_ETAS]
                      for target, names in by_target.items()}}


def render_sharpness(payload: dict) -> tuple[str, list[str]]:
    """The sharpness probe's rows (``first_step_sharpness``): a table of KL changes per target and step size, and
    per target the step that lowered the KL most and the first that raised it."""
    rows = payload.get("sharpness", [])
    if not rows:
        return "", []
    etas = rows[0]["etas"]
    columns = ["conversion, cores", "target"] + [f"step {eta:g}" for eta in etas]
    table, lines = [], []
    for row in rows:
        label = f"{row['lever']}, {row['core_scale']} cores, targets {row['targets']}"
        for target, deltas in row["delta"].items():
            table.append([label, target] + [f"{d:+.3f}" for d in deltas])
            best = min(range(len(etas)), key=lambda i: deltas[i])
            worse = next((f"from step {eta:g}" for eta, d in zip(etas, deltas) if d > 0), "at no step tried")
            lines.append(f"{label}, {target}: best first step {etas[best]:g} (KL {deltas[best]:+.3f} from "
                         f"{row['start_kl']:.3f}); KL above the start {worse}")
    title = (f"CLOVER's first Adam step per target (KV {HEAL_KEPT:.0%}; change in KL from the original on 8 "
             "validation windows, the gradient from 8 others; `--heal-sharpness`)")
    return section(title, "Each target's cores alone (all: every core) move by the step against the sign of their "
                   "gradient, which is what Adam's first update does whatever the gradient's size; a target whose KL "
                   "rises at a step the others still gain from caps one lr shared by all.", columns, table), lines


def with_reach_row(rows: list, row: dict) -> list:
    """``rows`` with ``row`` in: in place of the row of the same healing run (method, seed, settings, conversion)
    where one was measured before the test KL, so the table keeps its order; else appended."""
    key = ("method", "seed", "settings", "lever")
    same = [i for i, r in enumerate(rows) if all(r[k] == row[k] for k in key)]
    return rows[:same[0]] + [row] + rows[same[0] + 1:] if same else rows + [row]


def lever_of(row: dict) -> str:
    """The conversion a healing row tuned (rows name it only when it is not the comparison's). LoRA / PiSSA rows
    measured before conversions were written in CLOVER's balanced form (``balance_pairs``) tuned the same function
    with each pair's scale split as the solve left it, a different start for them: their conversion is named apart.
    CLOVER's own first step rewrites the pairs into that form (the SVD of each product), so its rows are the same
    whichever split they started from."""
    lever = row.get("lever", HEAL_LEVER)
    return lever + AS_SOLVED if row["method"] != "clover" and not row.get("balanced") else lever


def same_run(a: dict, b: dict) -> bool:
    """Whether two healing rows are the same run: kind, method, seed, settings and conversion."""
    return all(a[k] == b[k] for k in ("kind", "method", "seed", "settings")) and lever_of(a) == lever_of(b)


def function_of(lever: str) -> str:
    """The training-free row a conversion computes: the same for both splits of a pair's scale."""
    return lever.removesuffix(AS_SOLVED)


def in_group(row: dict, settings: dict, lever: str) -> bool:
    """Whether a healing row belongs to the (settings, conversion) group: its settings, and its conversion unless it
    is a control (a control tunes the original, so it serves every conversion)."""
    return row["settings"] == settings and (row["kind"] == "control" or lever_of(row) == lever)


def training_free(payload: dict) -> dict[str, float]:
    """Each row's ppl at the healed cache size: where every healing run starts."""
    return {r["name"]: r["ppl"] for r in payload["rows"] if r["kept"] == HEAL_KEPT}


def heal_groups(payload: dict) -> list[tuple[dict, str]]:
    """Every distinct (settings, conversion) the healing rows were run with: the comparison's (HEAL, HEAL_LEVER)
    first; controls belong to their settings' group with the comparison's conversion."""
    found = [(HEAL, HEAL_LEVER)]
    for row in payload.get("heal", []):
        key = (row["settings"], lever_of(row) if row["kind"] == "healed" else HEAL_LEVER)
        if key not in found:
            found.append(key)
    return found


def settings_label(settings: dict, lever: str = HEAL_LEVER) -> str:
    """What differs from the comparison's settings (HEAL) and conversion, e.g. ``lr 0.0001`` or ``steps 200``."""
    def shown(key, value) -> str:
        if key == "lr_scales":
            return ", ".join(f"{target} lr x{scale:g}" for target, scale in value.items())
        return f"{key} {value:g}" if isinstance(value, (int, float)) else f"{key} {value}"

    return ", ".join([shown(key, value) for key, value in settings.items() if HEAL.get(key) != value]
                     + ([f"from {lever}"] if lever != HEAL_LEVER else []))


def spread(values) -> dict:
    """Seed values as a verdict reads them: mean, sample sd (0 for one seed) and n (``se_of`` takes two)."""
    import statistics

    values = list(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def heal_summary(payload: dict, settings: dict | None = None, lever: str = HEAL_LEVER) -> dict:
    """Per (kind, method): ppl over seeds (mean, sd, n), the late held-out KL per seed (None where a row predates
    it) and the run's trainable count / LoRA rank, for the rows run with ``settings`` (default: the comparison's)
    from ``lever``, and the controls run with those settings."""
    import statistics

    out = {}
    for row in payload.get("heal", []):
        if in_group(row, settings or HEAL, lever):
            out.setdefault((row["kind"], row["method"]), []).append(row)
    summary = {}
    for key, rows in out.items():
        values = [r["ppl"] for r in rows]
        heldout = {r["seed"]: r.get("heldout_kl") for r in rows}
        summary[key] = {"heldout": heldout if None not in heldout.values() else None, **spread(values),
                        "trainable": rows[0]["trainable"], "lora_r": rows[0]["lora_r"],
                        "seconds": statistics.fmean(r["seconds"] for r in rows)}
    return summary


def render_heal(payload: dict) -> str:
    if not payload.get("heal"):
        return ""
    base = payload["base_ppl"]
    groups = heal_groups(payload)
    columns = ["method", "trainable (LoRA rank)", "ppl, mean +- sd (seeds)", "x base",
               "control ppl, mean +- sd (seeds)", "x control", "late KL, held out", "train s / run"]
    table = []
    for settings, lever in groups:
        summary = heal_summary(payload, settings, lever)
        label = settings_label(settings, lever)
        for method in HEAL_METHODS:
            h, c = summary.get(("healed", method)), summary.get(("control", method))
            if (h is None and c is None) or (h is None and lever != HEAL_LEVER):  # a control shows once
                continue
            h = h or c
            name = method + (f", {label}" if label else "") + ("" if summary.get(("healed", method)) else
                                                               ", control only")
            rank = "" if h["lora_r"] is None else f" (r={h['lora_r']})"
            spread = "-" if c is None else f"{c['mean']:.2f} +- {c['sd']:.2f} ({c['n']})"
            table.append([name, f"{h['trainable']:,}{rank}", f"{h['mean']:.2f} +- {h['sd']:.2f} ({h['n']})",
                          f"{h['mean'] / base:.3f}", spread,
                          "-" if c is None else f"{h['mean'] / c['mean']:.3f}",
                          "-" if not h["heldout"] else f"{mean_kl(h):.3f}",
                          f"{h['seconds']:.0f}"])
    levers = list(dict.fromkeys(lever for _, lever in groups))
    unhealed = training_free(payload)
    start = "; ".join(f"{function_of(lever)}: {unhealed[function_of(lever)]:.2f}" if function_of(lever) in unhealed
                      else f"{lever}: -" for lever in dict.fromkeys(map(function_of, levers)))
    title = (f"Healed at KV {HEAL_KEPT:.0%} (training-free {start}; base {base:.2f}): KL distillation from the "
             f"original on WikiText-2 validation, {HEAL['steps']} steps x {HEAL['batch_size']} x {HEAL['seqlen']} "
             f"tokens, lr {HEAL['lr']:g}, from {HEAL_LEVER} unless the row says otherwise")
    text = ("LoRA / PiSSA ranks are matched to CLOVER's trainable count on the same modules; the "
            "control is the original tuned the same way toward itself (same method, settings and data, on its own "
            "targets k, vo and up: it has no shared rotated key; its objective starts at zero, and it serves every "
            f"conversion). Rows from a conversion named '...{AS_SOLVED}' ran "
            "before `clover mla` wrote each exact pair in CLOVER's form (`mla/deepseek.py`, `balance_pairs`): the same "
            "function and training-free ppl, with each pair's scale split wherever the solve left it; CLOVER's rows "
            "serve both, since its first step is that rewrite. Late KL, held out: the mean KL logged over the last "
            "quarter of steps, on validation windows each drawn once and scored before the step that trains on them "
            "(mean over seeds; '-' for rows run before it was recorded); where every lr tried has it, each method's "
            f"lr is chosen by it at seed {SWEEP_SEED}, not by the test ppl.")
    return section(title, text, columns, table)


LR_KEYS = ("lr", "lr_scales", "adam_eps", "core_scale")  # what a method's sweep varies: its pick is its "lr"


def without_lr(settings: dict) -> dict:
    """A run's budget: its settings without the learning rate (per-target scales of it, Adam's epsilon, CLOVER's
    core scale)."""
    return {k: v for k, v in settings.items() if k not in LR_KEYS}


def lr_label(settings: dict) -> str:
    """``lr 0.001`` or ``lr 0.001, up x0.5``."""
    scales = settings.get("lr_scales", {})
    eps = f", Adam eps {settings['adam_eps']:g}" if "adam_eps" in settings else ""
    core = f", {settings['core_scale']} cores" if "core_scale" in settings else ""
    return (f"lr {settings['lr']:g}" + "".join(f", {target} x{scale:g}" for target, scale in scales.items()) + eps
            + core)


def best_of(groups: list, method: str, budget: dict, conversion: str, core_scale: str | None = None):
    """(settings, summary, how the lr was chosen) of the method's lr tried for ``budget`` (settings without the lr;
    ``core_scale``: only CLOVER's runs at that scale): by the late held-out KL at SWEEP_SEED where every lr tried
    has it (validation text only), else (rows from before it was recorded) by the mean test ppl over the lrs run
    with 2 or more seeds."""
    runs = [(s, summary[("healed", method)]) for s, lever, summary in groups
            if ("healed", method) in summary and without_lr(s) == budget and lever == conversion
            and core_scale in (None, s.get("core_scale", "unit"))]
    if runs and all((run[1]["heldout"] or {}).get(SWEEP_SEED) is not None for run in runs):
        return (*min(runs, key=lambda run: run[1]["heldout"][SWEEP_SEED]), "held-out KL")
    runs = [run for run in runs if run[1]["n"] >= 2]
    return (*min(runs, key=lambda run: run[1]["mean"]), "test ppl") if runs else None


def budgets_of(groups: list, conversion=lambda lever: lever) -> list[tuple[dict, str]]:
    """The distinct (settings without the lr, conversion) among ``groups``, in order: one comparison each."""
    budgets = []
    for settings, lever, _ in groups:
        if (without_lr(settings), conversion(lever)) not in budgets:
            budgets.append((without_lr(settings), conversion(lever)))
    return budgets


def kl_comparison(clover: dict, theirs: dict) -> str:
    """The late held-out KL of two summaries side by side (lower fits the original better), read against its spread
    where both have VERDICT_SEEDS or more seeds; empty where either has rows from before it was recorded."""
    import statistics

    if not (clover["heldout"] and theirs["heldout"]):
        return ""
    own, other = list(clover["heldout"].values()), list(theirs["heldout"].values())
    text = f"; late held-out KL {mean_kl(clover):.3f} vs {mean_kl(theirs):.3f}"
    if min(len(own), len(other)) < VERDICT_SEEDS:
        return text
    gap = mean_kl(theirs) - mean_kl(clover)
    se = math.sqrt(statistics.variance(own) / len(own) + statistics.variance(other) / len(other))
    return f"{text}, difference {gap:.3f}, 2 SE {2 * se:.3f} -> CLOVER {separation(gap, se)}"


def se_of(a: dict, b: dict) -> float:
    """The standard error of the difference of two summaries' seed means."""
    return math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])


def core_scale_findings(payload: dict) -> list[str]:
    """Within CLOVER, per budget run at both core scales (``finetune.modules._scaled_start``): each scale at its
    own best lr, over seeds, read against the spread like a peer."""
    groups = [(settings, lever, heal_summary(payload, settings, lever)) for settings, lever in heal_groups(payload)]
    lines = []
    for budget, lever in budgets_of(groups, function_of):  # CLOVER's rows serve either split (lever_of)
        picks = {scale: best_of(groups, "clover", budget, lever, scale) for scale in ("spectrum", "unit")}
        if not all(pick and pick[1]["n"] >= VERDICT_SEEDS for pick in picks.values()):
            continue
        (own, spectrum, _), (other, unit, _) = picks["spectrum"], picks["unit"]
        own = {key: value for key, value in own.items() if key != "core_scale"}  # named once, below
        gap = unit["mean"] - spectrum["mean"]
        se = se_of(spectrum, unit)
        scope = settings_label(budget, lever) or "the comparison's settings"
        lines.append(f"CLOVER healing with {scope}: spectrum cores "
                     f"({lr_label(own)}, {spectrum['n']} seeds) vs unit cores ({lr_label(other)}, {unit['n']} "
                     f"seeds), each at its lr by held-out KL: {spectrum['mean']:.2f} vs {unit['mean']:.2f} ppl, "
                     f"late KL {mean_kl(spectrum):.3f} vs {mean_kl(unit):.3f}, difference {gap:.2f}, 2 SE "
                     f"{2 * se:.2f} -> spectrum {separation(gap, se)}")
    return lines


def mean_kl(summary: dict) -> float:
    return sum(summary["heldout"].values()) / len(summary["heldout"]) if summary["heldout"] else math.nan


def heal_goals(payload: dict) -> list[str]:
    lines = []
    groups = [(settings, lever, heal_summary(payload, settings, lever)) for settings, lever in heal_groups(payload)]
    unhealed = training_free(payload)
    for settings, lever, summary in groups:
        done = {m: v for (kind, m), v in summary.items() if kind == "healed"}
        best = min(done, key=lambda m: done[m]["mean"]) if done else None
        control = summary.get(("control", best))
        if control:
            ratio = done[best]["mean"] / control["mean"]
            label = settings_label(settings, lever) or "the comparison's settings"
            lines.append(f"healed KV {HEAL_KEPT:.0%} within {HEALED_GOAL:.2f}x of the identically tuned base "
                         f"({label}): {ratio:.3f}x ({best}) -> {'MET' if ratio <= HEALED_GOAL else 'NOT MET'}")
    lines += uncontrolled_heal_goal(payload, groups)
    # the same conversion, steps, batch and data: one comparison each, every method at its best lr
    for budget in budgets_of(groups):
        mine = best_of(groups, "clover", budget[0], function_of(budget[1]))  # CLOVER's rows serve either split
        for peer in ("lora", "pissa"):
            other = best_of(groups, peer, budget[0], budget[1])
            if not (mine and other):
                continue
            (own_settings, clover, own_rule), (settings, theirs, rule) = mine, other
            scope = "" if budget[0]["steps"] == HEAL["steps"] else f" at {budget[0]['steps']} steps"
            extra = settings_label({k: v for k, v in budget[0].items() if k != "steps"})  # targets, warmup
            scope += f" with {extra}" if extra else ""
            source = "" if budget[1] == HEAL_LEVER else f" from {budget[1]}"
            start = unhealed.get(function_of(budget[1]), math.inf)
            if theirs["mean"] > start:  # a peer that left the model worse than it found it was not compared
                lines.append(f"CLOVER healing{scope}{source} vs {peer}: {peer} did not heal at any lr tried (best "
                             f"{theirs['mean']:.2f} ppl at {lr_label(settings)}, above the training-free "
                             f"{start:.2f}) -> no verdict")
                continue
            short = [f"{name} at {lr_label(s)}: {run['n']} seed{'s' * (run['n'] > 1)}" for name, s, run in
                     (("CLOVER", own_settings, clover), (peer, settings, theirs)) if run["n"] < VERDICT_SEEDS]
            if short:
                lines.append(f"CLOVER healing{scope}{source} vs {peer}: too few seeds "
                             f"({', '.join(short)}; {clover['mean']:.2f} vs {theirs['mean']:.2f} ppl"
                             f"{kl_comparison(clover, theirs)}) -> no verdict until each side has {VERDICT_SEEDS}")
                continue
            gap = theirs["mean"] - clover["mean"]
            se = se_of(clover, theirs)
            verdict = separation(gap, se)
            lines.append(f"CLOVER healing{scope}{source} ({lr_label(own_settings)} by {own_rule}, {clover['n']} "
                         f"seeds) vs {peer} ({lr_label(settings)} by {rule}, {theirs['n']} seeds): "
                         f"{clover['mean']:.2f} vs {theirs['mean']:.2f} ppl, difference {gap:.2f}, 2 SE {2 * se:.2f} "
                         f"-> ahead beyond the spread: {'yes' if verdict == 'ahead' else 'NO (' + verdict + ')'}"
                         f"{kl_comparison(clover, theirs)}")
    return lines


def uncontrolled_heal_goal(payload: dict, groups: list) -> list[str]:
    """The lowest healed mean over VERDICT_SEEDS or more seeds among the settings no control ran with (the later,
    longer runs, ``--no-heal-controls``), read against the untuned base, beside how far every control that did run
    moved the base: without it the goal lines above name only the early settings that had controls."""
    base = payload["base_ppl"]
    # a control serves every conversion tuned with its settings: keyed by method and settings, counted once
    drift = list({(method, json.dumps(settings, sort_keys=True, default=str)): abs(s["mean"] / base - 1)
                  for settings, _, summary in groups for (kind, method), s in summary.items()
                  if kind == "control"}.values())
    best = None
    for settings, lever, summary in groups:
        if any(kind == "control" for kind, _ in summary):
            continue
        for (kind, method), run in summary.items():
            if kind == "healed" and run["n"] >= VERDICT_SEEDS and (best is None or run["mean"] < best[2]["mean"]):
                best = (settings, lever, run, method)
    if best is None or not drift:
        return []
    settings, lever, run, method = best
    ratio = run["mean"] / base
    return [f"healed KV {HEAL_KEPT:.0%}, the best row with no control at its settings ({method}, "
            f"{settings_label(settings, lever)}, {run['n']} seeds): {run['mean']:.2f} ppl = {ratio:.3f}x the untuned "
            f"base (the {len(drift)} controls that ran stayed within {max(drift):.1%} of it) -> "
            f"{'MET' if ratio <= HEALED_GOAL else 'NOT MET'}"]


def render_reach(payload: dict) -> tuple[str, list[str]]:
    """Per peer and settings, over seeds: its healing, CLOVER's cores fitted to it (weighted, plain) and the share
    of the change out of the cores' reach per target, beside the training-free start and CLOVER's own healing at
    the same budget (its lr by held-out KL); where the rows carry it, the KL from the original on the test windows
    of the peer, its fit and CLOVER's own healing run beside them at that lr (``--heal-reach`` with clover), read
    over seeds.
    Run 68's rows also hold ``ppl_outside_alone``, the conversion plus the weight difference healed - fitted: the
    fit writes each Q-K and V-O pair in the cores' factorization, not the healed model's, so that difference mixes
    two factorizations of each pair and measured nothing; not shown."""
    import statistics

    rows = payload.get("reach", [])
    if not rows:
        return "", []
    groups: dict = {}
    for row in rows:
        key = (row["method"], json.dumps(row["settings"], sort_keys=True), row["lever"])
        groups.setdefault(key, []).append(row)
    heal = [(settings, lever, heal_summary(payload, settings, lever)) for settings, lever in heal_groups(payload)]
    unhealed = training_free(payload)
    columns = ["peer", "seeds", "start", "CLOVER healed", "peer healed", "cores fitted, weighted",
               "gain held", "cores fitted, plain", "change out of reach (weighted fit)",
               "out of reach (plain fit)", "test KL: start, peer, fit, CLOVER"]
    table, lines = [], []

    def mean(key, found):
        return statistics.fmean(r[key] for r in found)

    def shares(key, found):
        names = found[0][key]
        return ", ".join(f"{t} {statistics.fmean(r[key][t] for r in found):.0%}" for t in names)

    def read(lower: dict, higher: dict) -> str:
        """``lower`` against ``higher`` (a KL or ppl: lower is better) over seeds, beyond 2 SE only."""
        if min(lower["n"], higher["n"]) < VERDICT_SEEDS:
            return f"no verdict under {VERDICT_SEEDS} seeds a side"
        gap, se = higher["mean"] - lower["mean"], se_of(lower, higher)
        return f"difference {gap:.3f}, 2 SE {2 * se:.3f} -> {separation(gap, se)}"

    own_kl = {(json.dumps(json.loads(settings), sort_keys=True), lever): found
              for (method, settings, lever), found in groups.items() if method == "clover"}
    for (method, settings, lever), found in groups.items():
        if method == "clover":  # the reference the peers' rows are read against, not a peer
            continue
        settings = json.loads(settings)
        own = best_of(heal, "clover", without_lr(settings), function_of(lever))
        clover = f"{own[1]['mean']:.2f} ({own[1]['n']})" if own else "-"
        start = unhealed.get(function_of(lever), math.nan)
        label = f"{method}, {lr_label(settings)}, {settings_label(without_lr(settings), lever)}"
        healed, inside = mean("ppl", found), mean("ppl_inside_weighted", found)
        held = (start - inside) / (start - healed)
        measured = [r for r in found if "test_kl" in r]
        # CLOVER's reach rows at the lr (and core scale) its healing runs chose by held-out KL, never by test KL
        reference = own_kl.get((json.dumps(own[0], sort_keys=True), lever), []) if own else []
        kl_cell = "-"
        if measured:
            peer_kl = spread(r["test_kl"] for r in measured)
            fit_kl = spread(r["test_kl_inside_weighted"] for r in measured)
            own_cell = f"{mean('test_kl', reference):.3f} ({len(reference)})" if reference else "-"
            kl_cell = (f"{mean('test_kl_start', measured):.3f}, {peer_kl['mean']:.3f}, {fit_kl['mean']:.3f}, "
                       f"{own_cell}")
        table.append([label, str(len(found)), f"{start:.2f}", clover, f"{healed:.2f}", f"{inside:.2f}",
                      f"{held:.0%}", f"{mean('ppl_inside_plain', found):.2f}",
                      shares("outside_weighted", found),
                      shares("outside_plain", found), kl_cell])
        fitted = spread(r["ppl_inside_weighted"] for r in found)
        against = ""  # CLOVER's own healing against the fit, read like a peer: beyond 2 SE only
        if own and min(own[1]["n"], fitted["n"]) >= VERDICT_SEEDS:
            gap, se = inside - own[1]["mean"], se_of(own[1], fitted)
            against = (f" (difference {gap:.2f}, 2 SE {2 * se:.2f} -> CLOVER's own against the fit: "
                       f"{separation(gap, se)})")
        lines.append(f"{label} ({len(found)} seeds): healed {healed:.2f} ppl from {start:.2f}; CLOVER's cores "
                     f"fitted to it {inside:.2f}, {held:.0%} of its gain (plain fit "
                     f"{mean('ppl_inside_plain', found):.2f}); CLOVER's own healing {clover}{against}; share of the "
                     f"change out of reach (weighted fit): {shares('outside_weighted', found)}")
        if measured and reference:
            own_summary = spread(r["test_kl"] for r in reference)
            lost = (fit_kl["mean"] - peer_kl["mean"]) / (mean("test_kl_start", measured) - peer_kl["mean"])
            lines.append(f"{label}, test KL from the original ({len(measured)} seeds; CLOVER's own "
                         f"{lr_label(reference[0]['settings'])}, {len(reference)} seeds): "
                         f"start {mean('test_kl_start', measured):.3f}, peer {peer_kl['mean']:.3f}, CLOVER's cores "
                         f"fitted to it {fit_kl['mean']:.3f} ({lost:.0%} of the peer's KL gain lost out of reach), "
                         f"CLOVER's own {own_summary['mean']:.3f} (test ppl {mean('ppl', reference):.2f}); "
                         f"CLOVER's own against the peer: "
                         f"{read(own_summary, peer_kl)}; against the fit: {read(own_summary, fit_kl)}; the fit "
                         f"against the peer: {read(fit_kl, peer_kl)}")
    title = (f"What CLOVER's cores can reach of a peer's healing (KV {HEAL_KEPT:.0%}, WikiText-2 test ppl, mean over "
             "seeds; `--heal-reach`)")
    text = ("Each peer heals as in the table above; then every CLOVER core of the conversion is set to "
            "the least-squares fit of the healed weights (`clover.finetune.reach.project_`): a Q-K or V-O product, a "
            "rope query block or an MLP up block moves only inside the span of its frozen factors, so the fit is the "
            "closest model CLOVER's cores can express in weights (not in function: a lower bound on what they could "
            "hold). Weighted: errors priced by the second moments of what each side reads on the 16 calibration "
            "windows; plain: the weights' Frobenius norm. Gain held: the weighted fit's share of the peer's drop in "
            "ppl from the start. Out of reach: the share of the change's energy, in the fit's metric, per target; the "
            "peer's whole change, start to healed, is 100%. CLOVER healed: its own healing at the same steps, targets "
            "and warmup (its lr by held-out KL; seeds in brackets). Test KL: KL(original || model) per token on the "
            "same test windows as the ppl (`clover.heal.mean_kl`), for the start, the peer, the weighted fit and "
            "CLOVER's own healing run beside them at its lr (seeds in brackets; '-' where rows predate it).")
    return section(title, text, columns, table), lines


def goals_of(payload: dict) -> list[str]:
    base = payload["base_ppl"]
    rows = payload["rows"]
    engine = [r for r in rows if r["name"] != LATENT]

    def best(kept: float, peer: bool = False, refit: bool = False):
        here = [r for r in engine if r["kept"] == kept and ("TransMLA" in r["name"]) == peer
                and (LOCAL in r["name"]) == refit]
        return min(here, key=lambda r: r["ppl"]) if here else None

    lines = []
    for kept, limit in ((0.5, 1.25), (0.25, 1.6)):
        b, r = best(kept), best(kept, refit=True)
        if b:
            ratio = b["ppl"] / base
            lines.append(f"engine-ready KV {kept:.0%} <= {limit}x base ppl training-free: {ratio:.3f}x "
                         f"({b['name']}) -> {'MET' if ratio <= limit else 'NOT MET'}")
        if r:  # Adam on calibration text, block by block: not closed form, so read apart from the goal's rows
            ratio = r["ppl"] / base
            lines.append(f"the same with the layer-wise refit (Adam per block toward the original block's output on "
                         f"calibration text; no labels, no end-to-end pass): {ratio:.3f}x ({r['name']}) -> "
                         f"{'within' if ratio <= limit else 'NOT within'} {limit}x")
    for kept in KEPT:
        b = best(kept)
        t = best(kept, peer=True)
        if b and t:
            lines.append(f"KV {kept:.1%}: best clover lever {b['ppl']:.2f} ({b['name']}) vs the best TransMLA-recipe "
                         f"row {t['ppl']:.2f} ({t['name']}) -> {'ahead' if b['ppl'] < t['ppl'] else 'NOT ahead'}")
    return lines + heal_goals(payload)


def split_findings(payload: dict) -> list[str]:
    """Each per-layer split row against the same conversion with one split for every layer: the held-out KL both
    reach (the measure the search minimises), the test ppl, each layer's split and what the search cost."""
    rows = {(r["name"], r["kept"]): r for r in payload["rows"]}
    lines = []
    for (name, kept), row in rows.items():
        if "layer" not in row.get("split_losses", {}) or LOCAL in name:  # a refit row: see refit_findings
            continue
        losses = row["split_losses"]
        one = rows.get((name.split(", per-layer split")[0], kept))
        against = (f"; test ppl {one['ppl']:.2f} -> {row['ppl']:.2f}, conversion {one['seconds']:.0f} s -> "
                   f"{row['seconds']:.0f} s" if one else f"; test ppl {row['ppl']:.2f}, conversion "
                   f"{row['seconds']:.0f} s")
        start = losses[f"{row['split']:g}"]  # every layer at the one split the search starts from
        lines.append(f"{name} at KV {kept:.1%}: held-out KL {start:.3f} with one split "
                     f"({row['split']:g}) -> {losses['layer']:.3f} per layer{against}; splits by layer "
                     f"{', '.join(f'{x:g}' for x in row['layer_splits'])}")
    return lines


def refit_findings(payload: dict) -> list[str]:
    """Each layer-wise refit row against the same conversion without the refit (the row its name extends), and a
    residual-target row against the same refit toward the block's output alone."""
    rows = {(r["name"], r["kept"]): r for r in payload["rows"]}
    lines = []
    for (name, kept), row in rows.items():
        one = rows.get((name.split(LOCAL)[0], kept)) if LOCAL in name else None
        if one:
            inputs = CONVERTED if CONVERTED in name else " on the original inputs"
            inputs += " toward the original residual stream" if RESIDUAL in name else ""
            steps = LEVERS.get(name, {}).get("local_steps", LOCAL_STEPS)
            lines.append(f"{one['name']} at KV {kept:.1%}: test ppl {one['ppl']:.2f} -> {row['ppl']:.2f} with "
                         f"{steps} Adam steps a block{inputs} ({row['ppl'] / one['ppl'] - 1:+.1%}); conversion "
                         f"{one['seconds']:.0f} s -> {row['seconds']:.0f} s")
        plain = rows.get((name.replace(RESIDUAL, ""), kept)) if RESIDUAL in name else None
        if plain:
            lines.append(f"{plain['name']} at KV {kept:.1%}, the block's target with the residual stream's error "
                         f"added: test ppl {plain['ppl']:.2f} -> {row['ppl']:.2f} "
                         f"({row['ppl'] / plain['ppl'] - 1:+.1%})")
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
    findings = core_scale_findings(payload)
    for line in findings:
        print("finding:", line)
    splits = split_findings(payload)
    for line in splits:
        print("per-layer split:", line)
    refits = refit_findings(payload)
    for line in refits:
        print("layer-wise refit:", line)
    machines = "; ".join(f"run {i}: {machine_line(m)}" for i, m in enumerate(payload["runs"]))
    commands = "; ".join(f"run {i}: `{m['command']}`" if m.get("command") else f"run {i}: not recorded"
                         for i, m in enumerate(payload["runs"])) + " (each row names its run in the JSON)"
    heal_md = render_heal(payload)
    task_md, task_lines = render_tasks()
    for line in task_lines:
        print("second metric:", line)
    reach_md, reach_lines = render_reach(payload)
    for line in reach_lines:
        print("reach:", line)
    sharp_md, sharp_lines = render_sharpness(payload)
    for line in sharp_lines:
        print("sharpness:", line)
    have = {(r["name"], r["kept"]) for r in payload["rows"]}
    missing = [f"{name} at KV {', '.join(f'{k:.1%}' for k in SIZES[name] if (name, k) not in have)}"
               for name in SIZES if any((name, k) not in have for k in SIZES[name])]
    not_run = (" Not measured yet (`--missing` measures them): " + "; ".join(missing) + "." if missing else "")
    md = (f"Command: {commands}\n\nMachine: {machines}\n\n{title}. Calibration: 16 x 512 validation "
          "tokens. The latent holds what the rotated key leaves of the cache (KV 25%: 96 numbers per token, 64 of them "
          "rotated unless the row names fewer); at KV 12.5% the rows that name no rotated dims keep 16 (every 4th "
          "frequency) and a 32-dim latent. "
          "The TransMLA recipe rows are RoRoPE + NoPE + BKV (+ FreqFold) re-implemented from the paper's "
          "description; FreqFold has no 4 neighbours to fold among 16 rotated dims, so no KV 12.5% row." + not_run
          + "\n\n" + markdown_table(columns, table)
          + ("\n\nPer-layer key/value split (`split=\"layer\"`) against one split for every layer:\n\n"
             + "\n".join(f"- {line}" for line in splits) if splits else "")
          + ("\n\nLayer-wise refit (`local_steps`: each block tuned by Adam toward the original block's output on the "
             "calibration windows, kept where the held-out windows improve) against the same conversion without it:\n\n"
             + "\n".join(f"- {line}" for line in refits) if refits else "")
          + heal_md + reach_md + sharp_md + task_md + "\n\nGoals:\n\n" + "\n".join(f"- {line}" for line in goals)
          + ("\n\nCLOVER's core scale, side by side:\n\n" + "\n".join(f"- {line}" for line in findings)
             if findings else "")
          + ("\n\nSecond metric, side by side:\n\n" + "\n".join(f"- {line}" for line in task_lines)
             if task_lines else "")
          + ("\n\nCLOVER's reach of the peers' healing:\n\n" + "\n".join(f"- {line}" for line in reach_lines)
             if reach_lines else ""))
    update_benchmarks_md("mla_quality", md)


if __name__ == "__main__":
    main()
