"""Where a streaming conversion keeps its finished pieces, so an interrupted run resumes instead of restarting.

``<out>.partial/`` sits next to the output: one safetensors file per finished layer (and per group of the other
tensors), a ``progress.json`` naming what is finished and the settings it was made with, and small caches
(calibration hidden states, scores). Every file is written to a temporary name and renamed, and progress is
updated only after the file it names is complete, so a kill at any moment leaves a state the next run trusts.
When everything is done the shards get their final names, the index is written and the folder is renamed to
``<out>`` in one step: ``<out>`` is either complete or absent.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CloverError
from ..output import check_output_dir, move_into_place

PROGRESS = "progress.json"


@contextmanager
def disk_errors(path: Path, resume_hint: str) -> Iterator[None]:
    """Turn a failed write (full disk, quota, permissions) into a ``CloverError`` that says how to go on."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            usage = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd())
            raise CloverError(f"no space left on the device while writing {path} ({usage.free / 2**30:.2f} GiB "
                              f"free): free some space and rerun the same command; {resume_hint}") from error
        raise CloverError(f"could not write {path} ({error.strerror or error}): check the folder is writable "
                          f"and rerun the same command; {resume_hint}") from error


class WorkDir:
    """The ``<out>.partial`` folder of one conversion; ``progress`` is its JSON state (phase -> finished items)."""

    def __init__(self, out: str | os.PathLike, fingerprint: dict, overwrite: bool):
        self.out = check_output_dir(out, overwrite)
        self.overwrite = overwrite
        self.path = self.out.with_name(self.out.name + ".partial")
        self.fingerprint = fingerprint
        self.progress: dict = {"fingerprint": fingerprint}
        self.resumed = False

    @property
    def hint(self) -> str:
        return f"it resumes from the last finished layer kept in {self.path} (delete that folder to start over)"

    def open(self) -> WorkDir:
        progress_file = self.path / PROGRESS
        if progress_file.is_file():
            try:
                saved = json.loads(progress_file.read_text())
            except ValueError as error:
                raise CloverError(f"{progress_file} is damaged ({error}): delete {self.path} to start over") from error
            if saved.get("fingerprint") != self.fingerprint:
                raise CloverError(f"{self.path} holds an unfinished conversion with other settings or another source: "
                                  "rerun that exact command to finish it, or delete the folder to start this one")
            self.progress = saved
            self.resumed = True
        elif self.path.exists():
            shutil.rmtree(self.path)  # a folder without progress holds nothing a resume could trust
        with disk_errors(self.path, self.hint):
            self.path.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            self.save_progress()
        return self

    def done(self, phase: str) -> dict:
        return self.progress.setdefault(phase, {})

    def save_progress(self) -> None:
        path = self.path / PROGRESS
        tmp = path.with_name(f".{path.name}.tmp")
        with disk_errors(path, self.hint):
            tmp.write_text(json.dumps(self.progress, indent=1))
            os.replace(tmp, path)

    def finish(self, phase: str, key: int | str, record: object) -> None:
        """Mark ``key`` of ``phase`` finished (after its files are in place)."""
        self.done(phase)[str(key)] = record
        self.save_progress()

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        """Write one safetensors file atomically (``save_file`` needs contiguous tensors that share no memory)."""
        path = self.path / name
        tmp = path.with_name(f".{name}.tmp")
        payload = {k: v.contiguous() for k, v in tensors.items()}
        with disk_errors(path, self.hint):
            try:
                save_file(payload, tmp, metadata={"format": "pt", **(metadata or {})})
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return path

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / name)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def publish(self, shard_order: list[str], weight_map: dict[str, str], total_size: int,
                keep: tuple[str, ...]) -> Path:
        """Rename shards to ``model-0000i-of-0000n``, write the index, drop the caches, move the folder to ``out``."""
        n = len(shard_order)
        final = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shard_order)}
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        with disk_errors(self.path, self.hint):
            for old, new in final.items():
                os.replace(self.path / old, self.path / new)
            (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for entry in self.path.iterdir():
                if entry.name not in set(final.values()) | {"model.safetensors.index.json", *keep}:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            check_output_dir(self.out, self.overwrite)
            move_into_place(self.path, self.out)
        return self.out
