"""The text that perplexity is measured on and that whitening statistics are gathered from.

WikiText-2 is read from local parquet files whenever possible: the evaluation machines have no network, and the
files hold the hub dataset's rows verbatim, so numbers match those computed from ``datasets.load_dataset``.
"""

from __future__ import annotations

import os

import torch

from clover.errors import CloverError

# corpus name -> (folder name as published on the hub, arguments for datasets.load_dataset)
CORPORA: dict[str, tuple[str, tuple[str, str]]] = {
    "wikitext2": ("wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1")),
}
SPLITS = ("test", "validation")
ENV_VAR = "CLOVER_DATA"


def _corpus(corpus: str) -> tuple[str, tuple[str, str]]:
    if corpus not in CORPORA:
        raise CloverError(f"unknown corpus {corpus!r}: use one of {', '.join(sorted(CORPORA))}")
    return CORPORA[corpus]


def _parquet_name(split: str) -> str:
    return f"{split}-00000-of-00001.parquet"


def _parquet_path(given: str, folder_name: str, split: str, origin: str) -> str:
    """Find the split's parquet under ``given`` (a parquet file, the corpus folder, or a folder holding it)."""
    path = os.path.expanduser(str(given))
    if not os.path.exists(path):
        raise CloverError(
            f"corpus path {given} ({origin}) does not exist: point it at a folder holding {folder_name}/ "
            f"or at a .parquet file"
        )
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise CloverError(f"corpus file {given} ({origin}) is not a .parquet file: pass a .parquet file or folder")
        return path
    candidates = [os.path.join(path, folder_name, _parquet_name(split)), os.path.join(path, _parquet_name(split))]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise CloverError(
        f"corpus path {given} ({origin}) has no {split} split: expected {folder_name}/{_parquet_name(split)} "
        f"inside it (or {_parquet_name(split)} directly)"
    )


def _read_parquet(path: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CloverError(f"corpus file {path} could not be read as parquet with a 'text' column ({first})") from error
    return table.column("text").to_pylist()


def _from_hub(dataset_args: tuple[str, str], split: str, flag: str = "--data") -> list[str]:
    from .hub import unreachable_reason

    offline = unreachable_reason()
    if offline:
        raise CloverError(f"no local {dataset_args[1]} corpus and the hub is not available ({offline}): pass {flag} "
                          f"pointing at a folder holding {dataset_args[1]}/ or set {ENV_VAR}")
    try:
        import datasets

        rows = datasets.load_dataset(*dataset_args, split=split)["text"]
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise CloverError(
            f"could not download {'/'.join(dataset_args)} ({first}): pass {flag} pointing at a folder holding "
            f"{dataset_args[1]}/ or set {ENV_VAR}"
        ) from error
    return list(rows)


def load_rows(corpus: str = "wikitext2", split: str = "test", data: str | os.PathLike | None = None,
              flag: str = "--data") -> list[str]:
    """The corpus split as rows, exactly as the hub dataset stores them (one row per source line).

    Looks in ``data``, then ``$CLOVER_DATA``, then downloads from the hub. ``flag`` names the option that set
    ``data`` in messages (``--calib`` for calibration text).
    """
    folder_name, dataset_args = _corpus(corpus)
    if split not in SPLITS:
        raise CloverError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if data is not None:
        return _read_parquet(_parquet_path(os.fspath(data), folder_name, split, flag))
    env = os.environ.get(ENV_VAR)
    if env:
        return _read_parquet(_parquet_path(env, folder_name, split, f"${ENV_VAR}"))
    return _from_hub(dataset_args, split, flag)


def load_text(corpus: str = "wikitext2", split: str = "test", data: str | os.PathLike | None = None) -> str:
    """The split as one string, rows joined with blank lines: the protocol every published WikiText-2 number uses."""
    return "\n\n".join(load_rows(corpus, split, data))


def calibration_batches(tokenizer, rows: list[str], n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random, non-overlapping windows of ``seqlen`` tokens, shape (n_samples, seqlen).

    The corpus is tokenized once as a whole so windows cross row boundaries the way evaluation text does.
    Windows are drawn from the disjoint ``seqlen``-sized slots after a random offset, so they never overlap
    and the same seed always gives the same batch.
    """
    if n_samples < 1 or seqlen < 1:
        raise CloverError(f"calibration needs --calib-samples >= 1 and --calib-seqlen >= 1, got {n_samples} and "
                          f"{seqlen}")
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    needed = n_samples * seqlen
    if ids.numel() < needed:
        raise CloverError(
            f"calibration corpus has {ids.numel()} tokens but --calib-samples {n_samples} x --calib-seqlen {seqlen} "
            f"= {needed} were asked for: lower --calib-samples or --calib-seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    # Slack left after the maximum number of whole slots; a random shift of the slot grid uses it.
    slots = ids.numel() // seqlen
    offset = int(torch.randint(0, ids.numel() - slots * seqlen + 1, (1,), generator=generator))
    chosen = torch.randperm(slots, generator=generator)[:n_samples]
    starts = offset + chosen * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()]).long()
