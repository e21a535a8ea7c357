"""Writing results so that a failure never leaves a half-written directory behind.

Everything goes to a temporary sibling directory first and is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CloverError


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if ``out`` exists and may not be replaced."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise CloverError(f"output directory {path} exists: pass --overwrite to replace it, or choose another --out")
    if path.exists() and not path.is_dir():
        raise CloverError(f"output path {path} is a file, not a directory: choose another --out")
    return path


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error."""
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, path)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing an old ``path`` only once ``tmp`` is in place."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, payload: object) -> None:
    """Atomic JSON write (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:  # a failed write (a folder in the way, a full disk) leaves no temp file beside it
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model, tokenizer, out: str | os.PathLike, overwrite: bool = False, report: dict | None = None) -> Path:
    """``save_pretrained`` of model and tokenizer (plus clover's report) into ``out``, atomically.

    Pruned models (``clover_<family>``) also get their modeling file and an ``auto_map``, so the directory
    loads with ``trust_remote_code=True`` where clover is not installed.
    """
    from . import modeling

    if type(model).__module__.startswith("diffusers."):  # diffusers models have no tokenizer and their own layout
        from .modeling.clover_unet import save_unet

        return save_unet(model, out, overwrite, report)
    model_type = model.config.model_type
    with atomic_dir(out, overwrite) as tmp:
        if model_type.startswith("clover_"):
            source = modeling.remote_code_file(model_type)
            shutil.copyfile(source, tmp / source.name)
            model.config.auto_map = modeling.auto_map(model_type)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / "clover_report.json", report)
    return Path(out)
