"""The rows of ``mla_quality.py``: every lever's ``MlaConfig`` fields and the cache sizes it runs at, the healing
settings the comparison shares, how one row is converted, and what makes two healing rows the same run. The
benchmark's other parts (``_mla_heal``: the healing runs; ``_mla_render``: the BENCHMARKS.md section and the goals)
read these and nothing else of each other."""

from __future__ import annotations

from _report import REPO_ROOT, validation_windows

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
REFIT_ON_CONVERTED = dict(local_steps=LOCAL_STEPS, local_inputs="converted")  # the fields of LOCAL + CONVERTED
MLP = ", MLP refit"  # the stream refit of the MLP down projections alone (closed form, training-free)
STREAM = ", O and MLP refit"  # the stream refit of both: attention's O, then the MLP's down projection
STREAM_FIELDS = {MLP: dict(stream_refit=("down",)), STREAM: dict(stream_refit=("o", "down"))}


def stream_suffix(name: str) -> str | None:
    """The stream refit a row's name ends in (``MLP`` or ``STREAM``), None for a row without one."""
    return next((suffix for suffix in STREAM_FIELDS if name.endswith(suffix)), None)


KV25_EXTRA = {  # one more lever on the best KV 25% row, where the goal is not met: row suffix -> fields added
    ", mixed values": dict(value_moment="mixed"),
    **{f", {n} calibration windows": dict(calib_windows=n) for n in (64, 128)},
    ", per-layer split": dict(split="layer"),
    ", 64 calibration windows, per-layer split": dict(calib_windows=64, split="layer"),
    ", per-layer split, grid to 64": dict(split="layer", split_grid=(0.25, 1.0, 4.0, 16.0, 64.0)),
    LOCAL: dict(local_steps=LOCAL_STEPS),
    ", 64 calibration windows, per-layer split" + LOCAL: dict(calib_windows=64, split="layer",
                                                                       local_steps=LOCAL_STEPS),
    LOCAL + CONVERTED: REFIT_ON_CONVERTED,
    LOCAL + CONVERTED + RESIDUAL: dict(local_steps=LOCAL_STEPS, local_inputs="residual"),
    ", 64 calibration windows, per-layer split" + LOCAL + CONVERTED + ", 400 steps": dict(
        calib_windows=64, split="layer", local_steps=2 * LOCAL_STEPS, local_inputs="converted"),
    **{", 64 calibration windows, per-layer split" + suffix: dict(calib_windows=64, split="layer", **more)
       for suffix, more in STREAM_FIELDS.items()},
    ", 128 calibration windows, per-layer split": dict(calib_windows=128, split="layer"),
    ", 128 calibration windows, per-layer split" + STREAM: dict(calib_windows=128, split="layer",
                                                                **STREAM_FIELDS[STREAM]),
    ", 64 calibration windows, per-layer split" + LOCAL + MLP: dict(calib_windows=64, split="layer",
                                                                    local_steps=LOCAL_STEPS, **STREAM_FIELDS[MLP]),
}


# the best rotated dims of the other cache sizes, where OTHER_SIZE_EXTRA's levers also run (each on its own,
# beside the same row without it)
OTHER_SIZES = {48: (0.5,), 24: (0.125,)}
OTHER_SIZE_EXTRA = {", per-layer split": dict(split="layer"), LOCAL + CONVERTED: REFIT_ON_CONVERTED,
                    ", per-layer split" + LOCAL + CONVERTED: dict(split="layer", **REFIT_ON_CONVERTED),
                    **{", per-layer split" + suffix: dict(split="layer", **more)
                       for suffix, more in STREAM_FIELDS.items()}}
O_REFIT = dict(rope_key="query", unrotated="refit", o_refit=True)  # the strongest lever at 64 spread rotated dims
# the refits at full latent rank, where the only error left is the rotation the format cannot hold
FULL_RANK_REFIT = "rope key query, refit, O refit" + LOCAL + CONVERTED
FULL_RANK_MLP = "rope key query, refit, O refit" + MLP
FULL_RANK_STREAM = "rope key query, refit, O refit" + STREAM


LEVERS = {  # name -> MlaConfig fields, every lever spelled out (the config's defaults are the best levers found)
    "rope key pca, nope": dict(rope_key="pca", unrotated="nope", o_refit=False),
    "rope key query, nope": dict(rope_key="query", unrotated="nope", o_refit=False),
    "rope key attention, nope": dict(rope_key="attention", unrotated="nope", o_refit=False),
    "rope key query, expected": dict(rope_key="query", unrotated="expected", o_refit=False),
    "rope key query, refit": dict(rope_key="query", unrotated="refit", o_refit=False),
    "rope key query, refit, 32 rotated dims": dict(rope_key="query", unrotated="refit", rope_dims=32, o_refit=False),
    "rope key query, refit, O refit": O_REFIT,
    FULL_RANK_REFIT: dict(O_REFIT, **REFIT_ON_CONVERTED),
    FULL_RANK_MLP: dict(O_REFIT, **STREAM_FIELDS[MLP]),
    FULL_RANK_STREAM: dict(O_REFIT, **STREAM_FIELDS[STREAM]),
    **{fastest(dims): fastest_fields(dims) for dims in (48, 40, 32, 24, 16)},
    **{fastest(32) + suffix: fastest_fields(32, **more) for suffix, more in KV25_EXTRA.items()},
    **{fastest(dims) + suffix: fastest_fields(dims, **more) for suffix, more in OTHER_SIZE_EXTRA.items()
       for dims in OTHER_SIZES},
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
              **{fastest(dims) + suffix: kept for suffix in OTHER_SIZE_EXTRA for dims, kept in OTHER_SIZES.items()},
              FULL_RANK_REFIT: (1.0,), FULL_RANK_MLP: (1.0,), FULL_RANK_STREAM: (1.0,)})
BASE = "base (SmolLM2-135M)"
# the local task, built from test rows: 300 documents x 4 choices of ~60 tokens is ~4 minutes a model on 2 cores
TASK = dict(name="wikitext2_next_sentence", docs=300, choices=4, context=1, max_words=30, seed=0)
TASK_ROWS, TASK_KEPT = ("rope key query, refit, O refit", "TransMLA recipe (RoRoPE + NoPE + BKV)"), (0.5, 0.25)
TASK_PLAN = [(BASE, 1.0)] + [(name, kept) for kept in TASK_KEPT for name in TASK_ROWS]  # (row, KV kept), in order


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
