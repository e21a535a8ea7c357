"""Corpus resolution and calibration sampling. The real WikiText-2 parquet files are small enough to read here."""

from __future__ import annotations

import os

import pytest
import torch

from clover import data
from clover.errors import CloverError
from tiny_tokenizer import tiny_tokenizer

SHARED = os.environ.get("CLOVER_DATA") or ""
WIKITEXT = os.path.join(SHARED, "wikitext-2-raw-v1")
needs_wikitext = pytest.mark.skipif(not os.path.isdir(WIKITEXT), reason=f"{WIKITEXT} not present")

# Lengths of the splits joined with "\n\n", as every published WikiText-2 perplexity computes them.
JOINED_CHARS = {"test": 1_294_336, "validation": 1_149_668}


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)


@needs_wikitext
@pytest.mark.parametrize("split", ["test", "validation"])
def test_joined_split_lengths_match_the_hub_dataset(no_env, split):
    assert len(data.load_text(split=split, data=SHARED)) == JOINED_CHARS[split]


@needs_wikitext
def test_data_may_name_the_corpus_folder_or_the_parquet_file(no_env):
    rows = data.load_rows(split="validation", data=SHARED)
    assert data.load_rows(split="validation", data=WIKITEXT) == rows
    parquet = os.path.join(WIKITEXT, "validation-00000-of-00001.parquet")
    assert data.load_rows(split="validation", data=parquet) == rows
    assert rows[0] == "" and rows[1].startswith(" = Homarus gammarus =")


@needs_wikitext
def test_env_var_is_used_when_no_data_argument(monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, SHARED)
    assert len(data.load_text(split="test")) == JOINED_CHARS["test"]


def test_data_argument_wins_over_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    _write_parquet(folder / "test-00000-of-00001.parquet", ["a", "b"])
    assert data.load_rows(data=tmp_path) == ["a", "b"]


def test_nonexistent_data_path_names_the_path(no_env, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CloverError, match=rf"{missing}.*does not exist.*wikitext-2-raw-v1"):
        data.load_rows(data=missing)


def test_nonexistent_env_path_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(CloverError, match=r"CLOVER_DATA.*does not exist"):
        data.load_rows()


def test_folder_without_the_split_says_what_was_expected(no_env, tmp_path):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    _write_parquet(tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet", ["x"])
    with pytest.raises(CloverError, match=r"no validation split.*validation-00000-of-00001.parquet"):
        data.load_rows(split="validation", data=tmp_path)


@pytest.fixture
def online(monkeypatch):
    """Pretend the hub answers (the machine running the tests may be offline), so load_dataset is what decides."""
    from clover import hub

    monkeypatch.setattr(hub, "unreachable_reason", lambda timeout=3.0: None)


def test_hub_failure_tells_how_to_work_offline(no_env, online, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CloverError, match=r"--data.*CLOVER_DATA"):
        data.load_rows()


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_fails_fast_without_trying_the_hub(no_env, monkeypatch, var):
    """No corpus and an offline machine: the error comes at once, without the hub client's retries."""
    import datasets

    def never(*args, **kwargs):
        raise AssertionError("load_dataset must not be tried when offline")

    monkeypatch.setattr(datasets, "load_dataset", never)
    for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "1")
    with pytest.raises(CloverError, match=rf"hub is not available \({var} is set\).*--data.*CLOVER_DATA"):
        data.load_rows(split="validation")


def test_hub_is_the_last_resort(no_env, online, monkeypatch):
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["row one", "row two"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_text(split="validation") == "row one\n\nrow two"
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]


def test_unknown_corpus_and_split(no_env):
    with pytest.raises(CloverError, match="unknown corpus"):
        data.load_rows(corpus="ptb")
    with pytest.raises(CloverError, match="unknown split"):
        data.load_rows(split="train")


# ---- calibration ---------------------------------------------------------------------------------------------

ROWS = [f" The game number {i} was developed by Sega in {2000 + i} ." for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_calibration_batches_are_deterministic_windows_of_the_corpus(tok):
    a = data.calibration_batches(tok, ROWS, n_samples=4, seqlen=32, seed=0)
    b = data.calibration_batches(tok, ROWS, n_samples=4, seqlen=32, seed=0)
    c = data.calibration_batches(tok, ROWS, n_samples=4, seqlen=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ids = tok("\n\n".join(ROWS), return_tensors="pt").input_ids[0].tolist()
    starts = [_find(ids, window.tolist()) for window in a]
    assert all(s >= 0 for s in starts)
    starts.sort()
    assert all(later - earlier >= 32 for earlier, later in zip(starts, starts[1:], strict=False)), "windows overlap"


def test_calibration_can_use_the_whole_corpus(tok):
    n_tokens = tok("\n\n".join(ROWS), return_tensors="pt").input_ids.shape[1]
    batch = data.calibration_batches(tok, ROWS, n_samples=n_tokens // 16, seqlen=16)
    assert batch.shape == (n_tokens // 16, 16)


def test_calibration_shortage_says_how_many_tokens(tok):
    n_tokens = tok("\n\n".join(ROWS), return_tensors="pt").input_ids.shape[1]
    with pytest.raises(CloverError, match=rf"has {n_tokens} tokens but .* = {100 * 64}"):
        data.calibration_batches(tok, ROWS, n_samples=100, seqlen=64)


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), str(path))


def test_parquet_without_text_column_is_reported(no_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"other": ["x"]}), str(path))
    with pytest.raises(CloverError, match="'text' column"):
        data.load_rows(data=path)
