"""Task accuracy through lm-evaluation-harness, offline: a small multiple-choice task in the harness's own format
(a task YAML over a local JSON file), scored on tiny models clover loads and writes."""

import copy
import json
import os

import pytest
import torch
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from clover import LatentConfig, OrthogonalizeConfig, PruneConfig, orthogonalize_, prune, to_latent  # noqa: E402
from clover.cli import app  # noqa: E402
from clover.errors import CloverError  # noqa: E402
from clover.tasks import TaskConfig, evaluate_tasks, next_sentence_docs, write_choice_task  # noqa: E402

TASK = "clover_tiny_choice"
QUESTIONS = [  # (question, choices, index of the answer)
    ("The game began development in", ["2010", "the sea", "Robert"], 0),
    ("Valkyria Chronicles is a video game developed by", ["Sega", "Herons", "television"], 0),
    ("The play Herons was written by", ["Simon Stephens", "the BliTZ system"], 0),
    ("Robert Boulter is an English film, television and", ["theatre actor", "battle system", "Japan"], 0),
    ("It met with positive sales in", ["Japan", "2001", "the Bill"], 0),
    ("The game 's battle system is carried over directly from", ["Valkyria Chronicles", "Royal Court"], 0),
    ("He had a guest starring role on the television series", ["The Bill", "Sega", "2010", "critics"], 0),
    ("The play was performed in 2001 at the", ["Royal Court Theatre", "Unrecorded Chronicles"], 0),
]
CALIB = torch.randint(1, 300, (8, 32), generator=torch.Generator().manual_seed(1))
runner = CliRunner()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_choice_task(folder, TASK, [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS])
    write_choice_task(folder, "clover_missing_data", [{"question": "?", "choices": ["a", "b"], "label": 0}])
    (folder / "clover_missing_data.jsonl").unlink()  # a task whose local data is gone: cannot be loaded
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama(vocab_size=300, max_position_embeddings=256).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def score(model, task_dir, **kw):
    config = TaskConfig(tasks=[TASK], task_dir=task_dir, batch_size=4, log_samples=True, progress=False, **kw)
    return evaluate_tasks(model, tiny_tokenizer(), config)


def same_scores(a, b) -> None:
    """Per-choice log-likelihoods agree to a tolerance relative to their own scale, and so do the accuracies."""
    la = torch.tensor([x for doc in a.samples[TASK] for x in doc])
    lb = torch.tensor([x for doc in b.samples[TASK] for x in doc])
    assert la.shape == lb.shape and (la - lb).abs().max() <= 1e-4 * la.abs().max()
    assert (a.score(TASK).acc, a.score(TASK).acc_norm) == (b.score(TASK).acc, b.score(TASK).acc_norm)


def test_orthogonalized_and_latent_copies_score_as_the_original(task_dir):
    model = tiny_llama(vocab_size=300, max_position_embeddings=256)
    base = score(model, task_dir)
    assert base.score(TASK).documents == len(QUESTIONS)
    assert len(base.samples[TASK]) == len(QUESTIONS)
    assert [len(doc) for doc in base.samples[TASK]] == [len(c) for _, c, _ in QUESTIONS]
    s = base.score(TASK)
    assert 0 <= s.acc <= 1 and s.acc_stderr is not None and s.acc_norm is not None
    assert base.average == s.acc_norm  # acc_norm where the task reports it

    orthogonal = copy.deepcopy(model)
    orthogonalize_(orthogonal, OrthogonalizeConfig(progress=False))
    same_scores(score(orthogonal, task_dir), base)
    latent, _ = to_latent(model, LatentConfig(calibration=CALIB, progress=False))  # kv_ratio 0: exact
    same_scores(score(latent, task_dir), base)


def test_pruned_model_scores_end_to_end_and_limit_applies(task_dir):
    model = tiny_llama(vocab_size=300, max_position_embeddings=256)
    pruned, _ = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion="clover",
                                         qk_criterion="rotary-weight", progress=False))
    results = score(pruned, task_dir, limit=3)
    s = results.score(TASK)
    assert s.documents == 3 and len(results.samples[TASK]) == 3 and 0 <= s.acc <= 1
    payload = results.to_dict()
    assert payload["limit"] == 3 and payload["harness"].startswith("lm-eval ")
    assert payload["tasks"][0]["headline"] == payload["average"]


def test_bad_task_requests_fail_with_one_line(task_dir):
    model = tiny_llama(vocab_size=300, max_position_embeddings=256)
    with pytest.raises(CloverError, match="did you mean clover_tiny_choice"):
        evaluate_tasks(model, tiny_tokenizer(), TaskConfig(tasks=["clover_tiny_choise"], task_dir=task_dir))
    with pytest.raises(CloverError, match="--limit 0"):
        evaluate_tasks(model, tiny_tokenizer(), TaskConfig(tasks=[TASK], task_dir=task_dir, limit=0))
    with pytest.raises(CloverError, match="could not be loaded.*--task-dir"):
        evaluate_tasks(model, tiny_tokenizer(), TaskConfig(tasks=["clover_missing_data"], task_dir=task_dir))
    with pytest.raises(CloverError, match="no tokenizer"):
        evaluate_tasks(model, None, TaskConfig(tasks=[TASK], task_dir=task_dir))


ARTICLES = [  # WikiText's raw shape: article and section headings, paragraphs of tokenized sentences
    "", " = Alpha = \n", "",
    " Alpha one is a first sentence here . Alpha two follows the first one . Alpha three ends the paragraph now . \n",
    "", " = = Later = = \n", "",
    " Alpha four starts a new paragraph . Alpha five is short but long enough . Tiny . \n",
    " Alpha six opens the third paragraph . Alpha seven closes the third paragraph . \n",
    "", " = Beta = \n", "",
    " Beta one is about something else entirely . Beta two goes on about it . \n",
    " Beta three is its own paragraph here . Beta four comes right after three . \n",
    " Beta five stands in a third paragraph . Beta six ends this article now . \n",
]


def test_next_sentence_docs_are_true_continuations_against_the_same_article():
    docs = next_sentence_docs(ARTICLES, 6, choices=3, seed=1)
    assert docs == next_sentence_docs(ARTICLES, 6, choices=3, seed=1)  # deterministic
    assert docs != next_sentence_docs(ARTICLES, 6, choices=3, seed=2)
    for doc in docs:
        truth = doc["choices"][doc["label"]]
        last = doc["question"].split(" . ")[-1].split()[:2]  # e.g. ["Alpha", "two"]
        number = ["one", "two", "three", "four", "five", "six"].index(last[1])
        assert truth.startswith(f"{last[0]} {['one', 'two', 'three', 'four', 'five', 'six', 'seven'][number + 1]}")
        assert len(doc["choices"]) == 3 and len(set(doc["choices"])) == 3
        assert all(c.split()[0] == last[0] for c in doc["choices"])  # distractors from the same article
        assert all(5 <= len(c.split()) <= 40 and c.endswith(" .") for c in doc["choices"])  # "Tiny ." never
        paragraph = next(row for row in ARTICLES if doc["question"].split(" . ")[0] in row)
        assert all(c not in paragraph for i, c in enumerate(doc["choices"]) if i != doc["label"])
    assert len({d["label"] for d in next_sentence_docs(ARTICLES, 6, choices=3, seed=0)}) > 1
    with pytest.raises(CloverError, match="has 7 sentences .* fewer than the 8 asked: ask for fewer documents"):
        next_sentence_docs(ARTICLES, 8, choices=3)
    with pytest.raises(CloverError, match="choices >= 2"):
        next_sentence_docs(ARTICLES, 2, choices=1)


def test_continuation_task_is_scored_with_its_own_prompt(tmp_path):
    folder = write_choice_task(tmp_path, "clover_next", next_sentence_docs(ARTICLES, 6, choices=3), "{{question}}")
    assert 'doc_to_text: "{{question}}"' in (folder / "clover_next.yaml").read_text()
    results = evaluate_tasks(tiny_llama(vocab_size=300, max_position_embeddings=256), tiny_tokenizer(),
                             TaskConfig(tasks=["clover_next"], task_dir=folder, batch_size=4, progress=False))
    assert results.score("clover_next").documents == 6 and 0 <= results.score("clover_next").acc_norm <= 1


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_eval_tasks_table_and_json(model_dir, task_dir, tmp_path):
    code, out = run("eval", model_dir, "--tasks", TASK, "--task-dir", task_dir, "--batch-size", "4",
                    "--json", tmp_path / "t.json")
    assert code == 0, out
    assert TASK in out and "average (acc_norm, else acc)" in out and "±" in out
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["tasks"][0]["task"] == TASK and report["tasks"][0]["documents"] == len(QUESTIONS)
    assert 0 <= report["average"] <= 1 and report["num_fewshot"] == {TASK: 0}


def test_cli_prune_and_sweep_report_accuracy_next_to_perplexity(model_dir, task_dir, tmp_path):
    code, out = run("prune", model_dir, "--out", tmp_path / "p", "--vo-ratio", "0.5", "--criterion", "clover",
                    "--eval-tasks", TASK, "--task-dir", task_dir, "--task-limit", "4", "--json", tmp_path / "p.json")
    assert code == 0, out
    assert "task accuracy (average)" in out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["tasks_before"]["tasks"][0]["documents"] == 4
    assert 0 <= report["tasks_after"]["average"] <= 1
    # the saved pruned model scores through the same command as a stock one
    code, out = run("eval", tmp_path / "p", "--tasks", TASK, "--task-dir", task_dir, "--limit", "4",
                    "--json", tmp_path / "e.json")
    assert code == 0, out
    assert json.loads((tmp_path / "e.json").read_text())["average"] == report["tasks_after"]["average"]


@pytest.mark.skipif(not os.environ.get("CLOVER_DATA"), reason="WikiText-2 not found (set CLOVER_DATA)")
def test_cli_sweep_reports_accuracy(model_dir, task_dir, tmp_path):
    code, out = run("sweep", model_dir, "--ratios", "0.5", "--criteria", "clover", "--seqlen", "64",
                    "--max-windows", "2", "--eval-tasks", TASK, "--task-dir", task_dir, "--task-limit", "2",
                    "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert code == 0, out
    result = json.loads((tmp_path / "s.json").read_text())
    assert 0 <= result["base_tasks"]["average"] <= 1 and 0 <= result["tasks"]["clover"]["0.5"]["average"] <= 1
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--tasks", "clover_tiny_choise"], "unknown task 'clover_tiny_choise': did you mean clover_tiny_choice"),
    (["--tasks", TASK, "--limit", "0"], "--limit 0 scores no documents"),
    (["--tasks", "clover_missing_data"], "could not be loaded"),
])
def test_cli_bad_task_requests_exit_2_and_write_nothing(model_dir, task_dir, tmp_path, args, message):
    code, out = run("eval", model_dir, *args, "--task-dir", task_dir, "--json", tmp_path / "x.json")
    assert code == 2 and message in " ".join(out.split()) and "Traceback" not in out
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (set by .ci/run)")
def test_cli_hub_task_offline_names_the_fix(model_dir, tmp_path):
    code, out = run("eval", model_dir, "--tasks", "arc_easy", "--json", tmp_path / "x.json")
    assert code == 2 and "reaches the Hugging Face hub" in " ".join(out.split())
    assert not (tmp_path / "x.json").exists()


def test_cli_model_without_tokenizer_is_refused(task_dir, tmp_path):
    path = tmp_path / "no_tokenizer"
    tiny_llama(vocab_size=300).save_pretrained(path)
    code, out = run("eval", path, "--tasks", TASK, "--task-dir", task_dir)
    assert code == 2 and "has no tokenizer" in out


def test_commonsense_script_runs_offline_on_local_data(model_dir, task_dir, tmp_path, monkeypatch):
    """benchmarks/finetune_commonsense.py needs the hub at full scale; its --train-data / --task-dir path runs the
    same code on a tiny model here."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_commonsense.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as when run as a script: benchmarks/ on sys.path
    spec = importlib.util.spec_from_file_location("finetune_commonsense", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} Answer with the right option.", "output": c[a]}) + "\n"
                            for q, c, a in QUESTIONS * 4))
    results = module.main([
        "--model", str(model_dir), "--methods", "clover,lora", "--lora-r", "2", "--steps", "2", "--batch-size", "2",
        "--seqlen", "32", "--lrs", "clover=1e-3,lora=1e-3", "--tasks", TASK, "--task-dir", str(task_dir),
        "--train-data", str(data), "--eval-batch-size", "4", "--json", str(tmp_path / "c.json"), "--no-md"])
    assert [r["method"] for r in results["runs"]] == ["clover", "lora"]
    assert all(0 <= r["tasks"]["average"] <= 1 and r["trainable"] > 0 for r in results["runs"])
    assert json.loads((tmp_path / "c.json").read_text())["base"]["tasks"][0]["task"] == TASK
    with pytest.raises(SystemExit) as exit_info:  # a hub task offline, or an unknown one: one line, before training
        module.main(["--model", str(model_dir), "--tasks", "clover_tiny_choise", "--task-dir", str(task_dir),
                     "--train-data", str(data), "--no-md", "--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.json").exists()
