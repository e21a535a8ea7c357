"""The path every calibrating conversion verb (latent, slice, mla) takes before its own work: what config.json
decides, then the texts, then the weights, then the same checks on the loaded model, then the calibration windows.
Each refusal comes as early as the information it needs (``tests/test_refusals.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from .common import calibration_rows, calibration_windows, check_model_fits, default_calib_seqlen, load
from .report import test_text


@dataclass
class Peek:
    """What config.json said: the config (None where it is not cheap to read) and the lengths to check."""

    config: object
    calib_seqlen: int
    note: Optional[str]
    seqlens: dict[str, int] = field(default_factory=dict)


def peek(ctx: typer.Context, model: str, what: str, calib_seqlen: int, eval_ppl: bool, seqlen: int,
         check_config: Callable[[object, int], None] = lambda config, calib_seqlen: None) -> Peek:
    """The config-only checks: ``check_config(config, calib_seqlen)`` (the verb's rules), the context lengths, the
    default ``--calib-seqlen`` capped at the context."""
    from ..preflight import read_config

    config = read_config(model)
    calib_seqlen, note = default_calib_seqlen(ctx, config, calib_seqlen)
    seqlens = {"--calib-seqlen": calib_seqlen, **({"--seqlen": seqlen} if eval_ppl else {})}
    if config is not None:
        check_config(config, calib_seqlen)
        check_model_fits(config, model, seqlens, what)
    return Peek(config, calib_seqlen, note, seqlens)


def load_calibrated(ctx: typer.Context, model: str, peeked: Peek, what: str, *, dtype: Optional[str],
                    calib: Optional[Path], calib_samples: int, eval_ppl: bool, data: Optional[Path],
                    check_loaded: Callable[[object, int], None] = lambda model, calib_seqlen: None):
    """Texts read (a missing corpus fails before the weights load), the model loaded and checked again
    (``check_loaded(model, calib_seqlen)``), calibration windows cut. Returns (loaded, windows, test text, note)."""
    text = test_text(eval_ppl, data)
    calibration_rows(model, calib)
    loaded = load(model, dtype)
    calib_seqlen, note = peeked.calib_seqlen, peeked.note
    if peeked.config is None:  # GGUF or hub models are only known once loaded
        calib_seqlen, note = default_calib_seqlen(ctx, loaded.model, calib_seqlen)
        peeked.seqlens["--calib-seqlen"] = calib_seqlen
    check_loaded(loaded.model, calib_seqlen)
    check_model_fits(loaded.model, model, peeked.seqlens, what)
    return loaded, calibration_windows(loaded, calib, calib_samples, calib_seqlen), text, note
