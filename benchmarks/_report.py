"""Shared helpers for the benchmark scripts: machine description, atomic JSON, BENCHMARKS.md sections, tables.

Every number that ends up in BENCHMARKS.md or ``benchmarks/results/*.json`` is produced by a script through
these helpers, so reruns refresh them in place and nothing is typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
MD_HEADER = "# Benchmarks\n\nEvery number below is written by the script named in its section; rerun it to refresh.\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (CPU, cores, torch and its thread count, Python, UTC date)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_1m": load_average(),
    }


def load_average() -> float | None:
    """1-minute load average (other work on the machine skews timings; record it next to them)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine_line(info: dict[str, Any]) -> str:
    """One-line summary of :func:`machine_info` for reports."""
    return (
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"Python {info['python']}, measured {info['date_utc']} (load average {info.get('loadavg_1m')} at start)"
    )


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the result ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file in the same directory, then ``os.replace``)."""
    path = Path(path)
    _atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def update_benchmarks_md(section: str, markdown: str, path: str | os.PathLike | None = None) -> Path:
    """Replace the ``section`` block of BENCHMARKS.md (or append it), creating the file if needed; a block without
    its own heading gets ``## section``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", section):
        raise ValueError(f"bad section name {section!r}")
    path = Path(path) if path is not None else BENCHMARKS_MD
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    body = markdown.strip()
    if not body.startswith("#"):
        body = f"## {section}\n\n{body}"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else MD_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    if not text.endswith("\n"):
        text += "\n"
    _atomic_write_text(path, text)
    return path


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """GitHub-flavoured markdown table (cells are already-formatted values)."""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a table to the terminal with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(str(col), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def validation_windows(tokenizer, windows: int = 16, seqlen: int = 512):
    """Calibration windows from WikiText-2 validation: never the test split the benchmarks evaluate on."""
    from clover.data import calibration_batches, load_rows

    return calibration_batches(tokenizer, load_rows(split="validation"), windows, seqlen)


def smollm2_calibrated(windows: int = 16, seqlen: int = 512):
    """The offline default model and its calibration windows, as the SmolLM2 benchmarks load them."""
    from clover.models import load

    lm = load("smollm2-135m")
    return lm, validation_windows(lm.tokenizer, windows, seqlen)
