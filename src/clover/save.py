"""Saving a rewritten model so that it reloads with and without clover.

The folder is written through ``clover.output.atomic_dir`` (temporary sibling, renamed into place when complete);
the helpers of that module are re-exported here, where earlier versions defined them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .output import atomic_dir, check_output_dir, move_into_place, write_json  # noqa: F401  (re-exported)


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
