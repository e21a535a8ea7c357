"""Two CPU processes (gloo) train the same decomposed model with DDP and must end with identical merged weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_llama
from tiny_tokenizer import SAMPLE_TEXT, tiny_tokenizer

from clover.finetune import TuneConfig, attach, save_decomposed

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_end_with_identical_merged_weights(tmp_path):
    tokenizer = tiny_tokenizer(vocab_size=300)
    model = tiny_llama(vocab_size=320)
    attach(model, TuneConfig(progress=False))
    save_decomposed(model, tokenizer, tmp_path / "decomposed")  # the offline step: no rank runs an SVD
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT * 10)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [accelerate, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
               "--num_processes", "2", "--main_process_port", "29517", "-m", "clover.cli", "finetune",
               str(tmp_path / "decomposed"), "--data", str(data), "--steps", "3", "--batch-size", "2", "--seqlen", "32",
               "--lr", "1e-2", "--save-steps", "2", "--out", str(tmp_path / "out"),
               "--checkpoints", str(tmp_path / "ck"), "--json", str(tmp_path / "result.json")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    digests = [(tmp_path / "ck" / f"merged-rank{rank}.sha256").read_text().strip() for rank in (0, 1)]
    assert digests[0] == digests[1]
    assert (tmp_path / "out" / "config.json").is_file()
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world_size"], result["engine"]) == (2, "MULTI_CPU")  # really two data-parallel processes
