"""Per-target learning rates: one optimiser group per scale, each at the peak learning rate times its target's scale.

Why: a CLOVER core starts at ``diag(s)`` between frozen orthonormal factors, and Adam moves every entry by about
the learning rate whatever ``s`` is, so the same step is a small change to an MLP up block whose singular values
reach 50 and a large one to a core whose values are a few units. One learning rate for every target may then
under-train some and over-train others; ``--lr-scale up=0.5`` sets one target apart. LoRA / PiSSA take the same
scales on the modules the target adapts, so a comparison can give both methods the same schedule.

Scales are keyed by CLOVER's target names (``finetune.targets``); a target not named keeps scale 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import CloverError
from .targets import TARGETS, resolve_targets, target_modules

# Wrapper segments that DDP / FSDP / activation checkpointing / torch.compile put into parameter names.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def parse_lr_scales(spec: str | dict | Iterable[tuple[str, float]] | None) -> tuple[tuple[str, float], ...]:
    """``"up=0.5,rope=2"`` (or a dict, or ``(target, scale)`` pairs) as sorted ``(target, scale)`` pairs."""
    if not spec:
        return ()
    if isinstance(spec, dict):
        items = list(spec.items())
    elif not isinstance(spec, str):  # (target, scale) pairs, as parsed before
        items = [tuple(item) for item in spec]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            target, sep, value = part.partition("=")
            try:
                items.append((target.strip(), float(value)))
            except ValueError:
                sep = ""
            if not sep:
                raise CloverError(f"learning-rate scale {part!r} is not TARGET=NUMBER: pass e.g. --lr-scale up=0.5")
    scales: dict[str, float] = {}
    for target, value in items:
        if target not in TARGETS:
            raise CloverError(f"learning-rate scale for unknown target {target!r}: use some of {', '.join(TARGETS)}")
        if not float(value) > 0:
            raise CloverError(f"learning-rate scale {target}={value} is not positive: pass a number above 0")
        if scales.get(target, float(value)) != float(value):
            raise CloverError(f"target {target!r} is given two learning-rate scales: pass one")
        scales[target] = float(value)
    return tuple(sorted(scales.items()))


def _plain(name: str) -> str:
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def module_scales(model: nn.Module, method: str, targets, scales: tuple[tuple[str, float], ...]) -> dict:
    """For LoRA / PiSSA, taken before peft wraps ``model``: name of each module a scaled target adapts -> its scale.

    peft's adapters sit inside the module they adapt, so a LoRA parameter takes the scale of the target that adapts
    its module; a module two targets adapt (``qk`` and ``rope`` both reach ``q_proj``) must get one scale from both.
    Empty for CLOVER, whose cores carry their target in their names."""
    if not scales:
        return {}
    if method == "full":
        raise CloverError("--lr-scale scales CLOVER's targets: --method full trains every weight, use --lr alone")
    if method == "clover":
        return {}
    _, _, targets = resolve_targets(model, targets)
    wanted = dict(scales)
    _check_trained(wanted, targets)
    out: dict[str, float] = {}
    for target in targets:
        for module in target_modules(model, (target,)):
            scale = wanted.get(target, 1.0)
            if out.setdefault(module, scale) != scale:
                raise CloverError(f"{module} is adapted for more than one target, with different learning-rate "
                                  "scales: give those targets the same --lr-scale")
    return {module: scale for module, scale in out.items() if scale != 1.0}


def parameter_scales(model: nn.Module, method: str, scales: tuple[tuple[str, float], ...], modules: dict,
                     trained) -> dict:
    """Name of each trainable parameter of the prepared ``model`` that a scale applies to -> its scale (the rest keep
    1). CLOVER: the cores, named by their target (``up_core``, ``qk_core``, ...), of the ``trained`` targets; peft:
    the adapters inside the modules ``module_scales`` found."""
    if not scales:
        return {}
    named = [_plain(n) for n, p in model.named_parameters() if p.requires_grad]
    if method == "clover":
        wanted = dict(scales)
        _check_trained(wanted, trained)
        core_target = {name: name.rsplit(".", 1)[-1].removesuffix("_core") for name in named
                       if name.endswith("_core")}
        return {name: wanted[target] for name, target in core_target.items() if target in wanted}
    return {name: modules[module] for name in named if ".lora_" in name
            and (module := name.split(".lora_")[0].removeprefix("base_model.model.")) in modules}


def _check_trained(wanted: dict, trained) -> None:
    missing = [t for t in wanted if t not in trained]
    if missing:
        raise CloverError(f"--lr-scale names {', '.join(missing)}, not among the targets trained "
                          f"({', '.join(trained)}): add it to --targets or drop its scale")


def split_groups(optimizer, model: nn.Module, by_name: dict) -> None:
    """Split each of ``optimizer``'s parameter groups (as the Trainer made them: weight decay or not, ...) by scale,
    every part keeping its group's settings at the group's lr times its scale. The Trainer's schedule multiplies
    each group's own lr, so warmup and decay keep the ratios. Run before the first step (the state is empty)."""
    names = {id(p): _plain(n) for n, p in model.named_parameters()}
    split = []
    for group in optimizer.param_groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(by_name.get(names.get(id(p)), 1.0), []).append(p)
        split += [{**group, "params": params, "lr": group["lr"] * scale} for scale, params in sorted(by_scale.items())]
    optimizer.param_groups.clear()
    for group in split:
        optimizer.add_param_group(group)
