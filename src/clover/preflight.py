"""Checks that run before any weights load, so that bad input costs milliseconds and leaves nothing behind.

Every output path a command will write (``--out``, ``--json``, ``--plot``) is checked first: that it can be
created, that it is the right kind of path, and that writing it cannot destroy the model being read. Settings that
depend on the model (its context length, its head) are read from its config alone where that is cheap.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CloverError


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_creatable(path: Path, flag: str) -> None:
    """``path`` (or the folders leading to it) can be created: the nearest existing ancestor is a writable folder.
    Probed by creating a file there, since permission bits say nothing to root or on a read-only mount."""
    # Outputs are written as a temporary sibling and renamed into place: the parent is what must be writable.
    ancestor = _existing_ancestor(path.absolute().parent)
    if not ancestor.is_dir():
        raise CloverError(f"{flag} {path} cannot be created: {ancestor} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".clover-write-probe-", dir=ancestor)
    except OSError as error:
        raise CloverError(f"{flag} {path} is not writable ({error.strerror or error}): choose a path you can "
                          "write to") from None
    os.close(fd)
    os.unlink(probe)


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out_dir(out: str | os.PathLike, overwrite: bool, model: str | os.PathLike | None = None,
                  flag: str = "--out") -> Path:
    """``out`` may be written: not an existing folder unless ``overwrite``, not a file, creatable, and neither the
    model folder, inside it, nor a folder holding it (``--overwrite`` would delete the model)."""
    from .output import check_output_dir, claim

    path = check_output_dir(out, overwrite, take=False)
    if model is not None:
        source = Path(os.path.expanduser(str(model)))
        if source.exists():
            source = source.resolve()  # a folder, or a model file (.gguf) that only an enclosing --out endangers
            target = path.expanduser().resolve()
            if source.is_dir() and _same_or_inside(target, source):
                raise CloverError(f"{flag} {path} is the model folder or inside it ({source}): writing there would "
                                  "replace or mix with the model being read; choose a folder outside it")
            if _same_or_inside(source, target):
                raise CloverError(f"{flag} {path} holds the model {source}: replacing it would delete the model "
                                  "being read; choose another folder")
    _check_creatable(path, flag)
    claim(path)
    return path


def check_out_file(path: str | os.PathLike | None, flag: str, suffixes: tuple[str, ...] | None = None) -> None:
    """A report file (``--json``, ``--plot``) can be written: not a folder, a known extension, creatable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        example = path / ("report" + (suffixes or (".json",))[0])
        raise CloverError(f"{flag} {path} is a folder: give a file name, such as {example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise CloverError(f"{flag} {path} has an unknown extension {path.suffix or '(none)'}: use one of "
                          f"{', '.join(suffixes)}")
    _check_creatable(path, flag)


def plot_suffixes() -> tuple[str, ...]:
    """The file types matplotlib can write (png first)."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = sorted("." + k for k in FigureCanvasBase.get_supported_filetypes())
    return tuple(sorted(kinds, key=lambda k: k != ".png"))


def check_plot(path: str | os.PathLike | None) -> None:
    check_out_file(path, "--plot", plot_suffixes())


def check_json(path: str | os.PathLike | None) -> None:
    check_out_file(path, "--json", (".json",))


def read_config(model: str):
    """The transformers config of ``model`` without its weights, or None where reading it is not cheap or not
    applicable (a GGUF file is parsed whole; a diffusers folder has no transformers config)."""
    from .models import _quiet_transformers, resolve

    source = resolve(model)
    if source.gguf_file is not None or source.library != "transformers" or source.kind == "hub":
        return None
    from transformers import AutoConfig

    from . import modeling  # noqa: F401  (registers clover_* model types)

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(source.path)
    except Exception:  # the loader reports a broken config with its own message
        return None


def check_seqlen(config, seqlen: int, flag: str) -> None:
    """``seqlen`` tokens fit the model's context (``flag`` names the option in the message)."""
    if seqlen < 1:
        raise CloverError(f"{flag} {seqlen} must be at least 1")
    from .evaluate import context_length

    limit = context_length(config) if config is not None else None
    if limit is not None and seqlen > limit:
        raise CloverError(f"{flag} {seqlen} is beyond the model's context of {limit} tokens: pass {flag} {limit} "
                          "or less")


def architecture(config) -> str | None:
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else None
