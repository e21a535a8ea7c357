"""A safetensors checkpoint read tensor by tensor, never whole: the index says which shard holds what.

Shards are opened with ``safetensors.safe_open`` (memory-mapped) only for the tensors asked for and closed right
after, so resident memory holds what the caller keeps, not the checkpoint. Everything that can be wrong with the
files (a missing shard, an index naming tensors a shard does not hold, a dtype that is not a float where clover
needs one) is found by ``open_checkpoint`` from the headers alone, before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CloverError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}


def is_streamable(folder: str | os.PathLike) -> bool:
    """A folder with a sharded safetensors index: the layout big checkpoints come in."""
    return (Path(folder) / INDEX_FILE).is_file()


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * BYTES.get(self.dtype, 1)


class Checkpoint:
    """Names, shapes and dtypes of every tensor, and reads of a few at a time (cast to ``dtype`` if given)."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], dtype: torch.dtype | None):
        self.folder = folder
        self.tensors = tensors
        self.dtype = dtype

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The float dtype most of the checkpoint's bytes are stored in."""
        totals: dict[str, int] = {}
        for info in self.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        if not totals:
            raise CloverError(f"{self.folder} holds no floating-point tensors: clover needs float weights")
        return FLOAT_DTYPES[max(totals, key=totals.get)]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def output_bytes(self, name: str) -> int:
        info = self.tensors[name]
        if self.dtype is not None and info.dtype in FLOAT_DTYPES:
            return info.nbytes // BYTES[info.dtype] * self.dtype.itemsize
        return info.nbytes

    def require(self, names: Iterable[str], what: str) -> None:
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise CloverError(f"{self.folder} lacks {len(missing)} tensor(s) the {what} needs, e.g. {missing[0]!r}: "
                              "the checkpoint is incomplete or of another architecture than its config.json says")

    def require_float(self, names: Iterable[str]) -> None:
        for name in names:
            dtype = self.tensors[name].dtype
            if dtype not in FLOAT_DTYPES:
                raise CloverError(f"tensor {name} is stored as {dtype}, not a float dtype (a quantized checkpoint?): "
                                  "clover decomposes float weights; dequantize the checkpoint to float16/bfloat16/"
                                  "float32 first")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load ``names`` (each shard opened once, then closed), cast to ``dtype`` where they are floats."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.tensors[name].shard, []).append(name)
        out = {}
        for shard, wanted in by_shard.items():
            path = self.folder / shard
            try:
                with safe_open(path, framework="pt") as f:
                    for name in wanted:
                        tensor = f.get_tensor(name)
                        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
                            tensor = tensor.to(self.dtype)
                        out[name] = tensor
            except (SafetensorError, OSError) as error:
                raise CloverError(f"shard {path} could not be read ({error}): it changed or is damaged since the "
                                  "conversion started; restore it and rerun") from error
        return out


def _read_index(folder: Path) -> dict[str, str]:
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CloverError(f"{index_path} is not a safetensors index ({error}): it needs a \"weight_map\" of "
                              "tensor name -> shard file; re-save the checkpoint with save_pretrained") from error
        if not isinstance(weight_map, dict) or not weight_map:
            raise CloverError(f"{index_path} has an empty weight_map: re-save the checkpoint with save_pretrained")
        return weight_map
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CloverError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}: streaming needs safetensors weights; "
                      "re-save the model with save_pretrained (safe_serialization is the default)")


def open_checkpoint(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read the index and every shard's header; raise ``CloverError`` on anything missing or inconsistent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CloverError(f"checkpoint folder {folder} does not exist: pass a folder written by save_pretrained")
    weight_map = _read_index(folder)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CloverError(f"shard {missing[0]} named by {folder / INDEX_FILE} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + ": copy every shard into the folder (an interrupted download?) and rerun")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt") as f:
                held = set(f.keys())
                infos = {}
                for name in held:
                    piece = f.get_slice(name)
                    infos[name] = TensorInfo(shard, piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as error:
            raise CloverError(f"shard {folder / shard} is not a readable safetensors file ({error}): "
                              "re-download or re-save it") from error
        named = [n for n, s in weight_map.items() if s == shard]
        absent = [n for n in named if n not in held]
        if absent:
            raise CloverError(f"{INDEX_FILE} says {shard} holds {absent[0]!r}"
                              + (f" and {len(absent) - 1} more tensor(s)" if len(absent) > 1 else "")
                              + " but it does not: the index and the shards come from different saves; "
                              "re-save the checkpoint (or fix its index)")
        for name in named:
            tensors[name] = infos[name]
    if dtype is not None and not dtype.is_floating_point:
        raise CloverError(f"--dtype {dtype} is not a float dtype: use float32, bfloat16 or float16")
    return Checkpoint(folder, tensors, dtype)
