"""The healing runs of ``mla_quality.py`` (``--heal``, ``--heal-reach``, ``--heal-sharpness``): the flags read into
a plan, the KV 25% conversions made once (and cached, ``--conversion-cache``), each healed conversion or control
tuned, the peers' healing reached by CLOVER's cores, and CLOVER's first step probed per target."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from _mla_rows import CONTROL_SEEDS, HEAL, HEAL_KEPT, HEAL_LEVER, HEAL_TARGETS, LEVERS, SHARP_ETAS, convert, \
    in_group, lever_calibration


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
