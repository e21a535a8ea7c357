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
  before it converted and refit), still toward the original block's output (``local_inputs="converted"``), also
  on the 48 and 24 rotated-dims rows at KV 50% and 12.5% (``OTHER_SIZES``), without and with their per-layer
  split, and at KV 100% on the ``rope key query, refit, O refit`` row, where only the rotation's error is left
  (``FULL_RANK_REFIT``); "residual target": the same, toward the original block's output plus the original residual
  stream's difference from the converted one where the layer begins, so each block also makes up the error in what
  it adds to (``local_inputs="residual"``), on the 32-rotated-dims row beside its converted-inputs row; "400
  steps": twice ``LOCAL_STEPS`` (the lr decays over the longer run), on the best row;
- stream refit: last, each layer's MLP down projection ("MLP refit"), or first its attention O projection and then
  its down projection ("O and MLP refit"), re-solved in closed form (ridge least squares, first to last on the
  converted model's own stream) toward the original residual stream at the same point, each kept where the 4
  held-out windows improve (``stream_refit``, ``mla/stream.py``): training-free, on the per-layer-split rows of KV
  50% / 25% / 12.5% (``MLP``, ``STREAM``), at KV 25% also (O and MLP) on 128 calibration windows, beside the same
  conversion without it, and (MLP) after the layer-wise refit of the best row, and at KV 100% on the ``rope key
  query, refit, O refit`` row (``FULL_RANK_MLP``, ``FULL_RANK_STREAM``), where only the rotation's error is left;
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

The parts, one job each: ``_mla_rows.py`` (the levers, sizes and healing settings, how a row is converted),
``_mla_heal.py`` (the healing runs and probes), ``_mla_render.py`` (the section and the goals, from the JSON
alone); this file reads the flags and runs what they ask.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mla_heal import Conversions, first_step_sharpness, heal_plan, heal_runs, reach_runs  # noqa: E402
from _mla_render import render  # noqa: E402
from _mla_rows import BASE, HEAL, HEAL_LEVER, HEAL_METHODS, HEAL_SEEDS, HEAL_TARGETS, LATENT, LEVERS, RESULTS, \
    SIZES, TASK, TASK_PLAN, TASK_RESULTS, convert, lever_calibration, same_run, with_reach_row  # noqa: E402
from _report import machine_info, smollm2_calibrated, write_json  # noqa: E402


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
                if report.layers[0].stream:  # the stream refit's held-out error per projection and layer
                    row["stream_fits"] = {p: [[lr.stream[p].before, lr.stream[p].after, lr.stream[p].kept,
                                               lr.stream[p].ridge] for lr in report.layers]
                                          for p in report.layers[0].stream}
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


if __name__ == "__main__":
    main()
