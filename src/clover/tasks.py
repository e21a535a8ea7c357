"""Downstream task accuracy through lm-evaluation-harness: the numbers CLOVER, SliceGPT, TransMLA and Palu report.

The harness does all of the scoring. Its own ``HFLM`` class wraps the model object as it is, so a pruned
``clover_*`` or latent model is scored with the same tokenizer, prompts and options as the stock model it came
from; this module only checks a request before any work, runs it, and reads back accuracy with the harness's
standard errors.

The average is the one the compression papers' tables use (SliceGPT's convention): per task ``acc_norm`` where the
task reports it (ARC, PIQA, HellaSwag, OpenBookQA), else ``acc`` (WinoGrande, MMLU), then the plain mean over the
tasks asked for. A group such as ``mmlu`` counts once, with the harness's own aggregate over its subjects.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CloverError

PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa", "winogrande", "mmlu")
INSTALL_HINT = "pip install 'clover[tasks]' (lm-eval)"


@dataclass
class TaskConfig:
    """What to ask the harness. ``task_dir``: an extra folder of task YAMLs (a local dataset, a mirror of a hub
    task), searched after the harness's own tasks, so a name there can also replace one of them."""

    tasks: Sequence[str] = PAPER_TASKS
    limit: int | None = None  # documents per task (for a quick look; published numbers use all of them)
    num_fewshot: int | None = None  # None: each task's own default (0 for all of PAPER_TASKS)
    batch_size: int = 8
    task_dir: str | os.PathLike | None = None
    log_samples: bool = False  # keep each document's per-choice log-likelihoods in TaskResults.samples
    progress: bool = True

    def check(self) -> None:
        names = list(self.tasks)
        if not names or any(not str(n).strip() for n in names):
            raise CloverError("no tasks given: pass --tasks as a comma-separated list, e.g. "
                              + ",".join(PAPER_TASKS))
        if self.limit is not None and self.limit < 1:
            raise CloverError(f"--limit {self.limit} scores no documents: pass a positive count, or leave it out "
                              "to score every document")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CloverError(f"--num-fewshot {self.num_fewshot} is negative: pass 0 or more examples")
        if self.batch_size < 1:
            raise CloverError(f"--batch-size {self.batch_size} must be at least 1")
        if self.task_dir is not None and not os.path.isdir(self.task_dir):
            raise CloverError(f"--task-dir {self.task_dir} is not a folder: pass a folder of lm-eval task YAMLs")


@dataclass(frozen=True)
class TaskScore:
    """One task (or group) as the harness scored it; ``*_stderr`` is the harness's standard error."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    documents: int | None  # documents scored (after --limit); None for a group, which aggregates its tasks

    @property
    def headline(self) -> float:
        """The figure the papers' averages use: acc_norm where the task has it, else acc."""
        return self.acc if self.acc_norm is None else self.acc_norm


@dataclass
class TaskResults:
    scores: list[TaskScore]
    num_fewshot: dict[str, int]
    limit: int | None
    harness_version: str
    samples: dict[str, list[list[float]]] = field(default_factory=dict)  # task -> per document, per choice

    @property
    def average(self) -> float:
        return sum(s.headline for s in self.scores) / len(self.scores)

    def score(self, task: str) -> TaskScore:
        return next(s for s in self.scores if s.task == task)

    def to_dict(self) -> dict:
        return {"tasks": [asdict(s) | {"headline": s.headline} for s in self.scores], "average": self.average,
                "average_rule": "mean over tasks of acc_norm where reported, else acc",
                "num_fewshot": self.num_fewshot, "limit": self.limit, "harness": f"lm-eval {self.harness_version}"}


def _harness():
    """lm_eval, imported on first use (it takes seconds, and clover works without it)."""
    try:
        import lm_eval
    except ImportError:
        raise CloverError(f"task accuracy needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") \
            from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _manager(task_dir: str | None):
    """The harness's task index (thousands of YAMLs, several seconds to build), once per folder per process."""
    _harness()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir)


def manager_for(config: TaskConfig):
    return _manager(None if config.task_dir is None else os.path.abspath(config.task_dir))


def _unreachable(error: BaseException, names: Sequence[str]) -> CloverError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CloverError(f"the dataset of {', '.join(names)} could not be loaded ({first}): run on a machine that "
                       "reaches the Hugging Face hub, or put the data in a local task YAML and pass --task-dir")


def _check_names(config: TaskConfig):
    """Settings valid and every name known to the harness (close matches offered otherwise); returns the index."""
    config.check()
    manager = manager_for(config)
    known = set(manager.all_tasks)
    for name in config.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks` for the names"
            raise CloverError(f"unknown task {name!r}: {hint}")
    return manager


def check_tasks(config: TaskConfig) -> None:
    """Every name known to the harness and every dataset loadable, before a model is loaded or anything written
    (the CLI's preflight; ``evaluate_tasks`` itself loads the datasets only once, inside the harness)."""
    manager = _check_names(config)
    try:
        manager.load(list(config.tasks))
    except (ConnectionError, OSError, ValueError) as exc:  # hub unreachable, missing local file, bad YAML
        raise _unreachable(exc, list(config.tasks)) from None


def _float(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # groups may report "N/A"


def _metric(entry: dict, name: str) -> float | None:
    """The harness keys metrics as "<metric>,<filter>"; multiple-choice tasks use the "none" filter."""
    for key, value in entry.items():
        if key.split(",")[0] == name:
            return _float(value)
    return None


def _top_level(results: dict) -> list[str]:
    """Tasks and groups that are not part of another group in this run: one row each, in the harness's order."""
    children = {c for kids in results.get("group_subtasks", {}).values() for c in kids}
    return [name for name in results["results"] if name not in children]


def _scores(results: dict) -> list[TaskScore]:
    scores = []
    for name in _top_level(results):
        entry = results["results"][name]
        acc = _metric(entry, "acc")
        if acc is None:
            raise CloverError(f"task {name} reports no accuracy (metrics: "
                              f"{', '.join(sorted(k.split(',')[0] for k in entry if ',' in k))}): clover reports "
                              "multiple-choice tasks scored by acc / acc_norm")
        documents = results.get("n-samples", {}).get(name, {}).get("effective")
        scores.append(TaskScore(task=name, acc=acc, acc_stderr=_metric(entry, "acc_stderr"),
                                acc_norm=_metric(entry, "acc_norm"), acc_norm_stderr=_metric(entry, "acc_norm_stderr"),
                                documents=documents))
    return scores


def _choice_logliks(samples: dict) -> dict[str, list[list[float]]]:
    return {task: [[float(resp[0][0]) for resp in doc["resps"]] for doc in docs] for task, docs in samples.items()}


def evaluate_tasks(model, tokenizer, config: TaskConfig) -> TaskResults:
    """Score ``model`` on ``config.tasks`` with the harness's HFLM (its own prompts, scoring and stderr)."""
    _check_names(config)
    if tokenizer is None:
        raise CloverError("the model has no tokenizer: save one next to the weights to score tasks")
    lm_eval = _harness()
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    quiet = logging.getLogger("lm_eval")
    before = quiet.level
    if not config.progress:
        quiet.setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=config.batch_size,
                  device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(config.tasks), task_manager=manager_for(config),
                                      num_fewshot=config.num_fewshot, limit=config.limit,
                                      log_samples=config.log_samples)
    except (ConnectionError, OSError) as exc:
        raise _unreachable(exc, list(config.tasks)) from None
    finally:
        model.train(was_training)
        quiet.setLevel(before)
    return TaskResults(scores=_scores(out), num_fewshot={k: int(v) for k, v in out.get("n-shot", {}).items()},
                       limit=config.limit, harness_version=importlib.metadata.version("lm_eval"),
                       samples=_choice_logliks(out.get("samples", {})) if config.log_samples else {})


def write_choice_task(folder: str | os.PathLike, name: str, docs: Sequence[dict],
                      prompt: str = "Question: {{question}}\nAnswer:") -> Path:
    """A multiple-choice task in the harness's own format, for data the hub does not serve: ``docs`` (dicts with
    ``question``, ``choices`` and the index ``label`` of the right one) as JSON lines, and a task YAML reading them,
    scored by acc and acc_norm. ``prompt`` is the harness's ``doc_to_text`` template (``"{{question}}"`` for a
    continuation task, whose choices follow the text directly). Returns the folder, to pass as
    ``TaskConfig.task_dir`` / ``--task-dir``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps({k: d[k] for k in ("question", "choices", "label")}) + "\n" for d in docs),
                    encoding="utf-8")
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("acc", "acc_norm"))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"output_type: multiple_choice\ntest_split: test\ndoc_to_text: {json.dumps(prompt)}\n"
        'doc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        f"metric_list:\n{metrics}metadata:\n  version: 1.0\n", encoding="utf-8")
    return folder


_ARTICLE = re.compile(r"^ = [^=].* = $")  # " = Title = "; sections are " = = Title = = "
_SENTENCE_END = re.compile(r"(?<= \.) ")  # WikiText is tokenized: a sentence ends in " ."


def next_sentence_docs(rows: Sequence[str], count: int, choices: int = 4, seed: int = 0, context: int = 2,
                       words: tuple[int, int] = (5, 40)) -> list[dict]:
    """A next-sentence choice task built from raw WikiText rows, a downstream score for machines without the hub's
    task data. Context: up to ``context`` sentences of a paragraph; choices: its true next sentence and ``choices - 1``
    sentences from other paragraphs of the same article, so the topic's words do not give the answer away and
    coherence has to. Every choice has ``words`` (min, max) words. Deterministic in ``seed``; ``label`` is where
    the true sentence landed. Docs for :func:`write_choice_task` with ``prompt="{{question}}"``."""
    import random

    if count < 1 or choices < 2 or context < 1:
        raise CloverError(f"a next-sentence task needs count >= 1, choices >= 2 and context >= 1 sentence, got "
                          f"{count}, {choices} and {context}")
    articles: list[list[list[str]]] = []  # article -> paragraph -> sentences
    for row in rows:
        line = row.strip()
        if _ARTICLE.match(row.rstrip("\n")):
            articles.append([])
        elif line and not line.startswith("= ") and articles:
            articles[-1].append([s.strip() for s in _SENTENCE_END.split(line) if s.strip()])

    def fits(sentence: str) -> bool:
        return words[0] <= len(sentence.split()) <= words[1]

    candidates = []  # (context, truth, distractor pool)
    for paragraphs in articles:
        for p, sentences in enumerate(paragraphs):
            pool = [s for q, other in enumerate(paragraphs) if q != p for s in other if fits(s)]
            if len(pool) < choices - 1:
                continue
            for i in range(1, len(sentences)):
                if fits(sentences[i]) and sum(s != sentences[i] for s in pool) >= choices - 1:
                    candidates.append((" ".join(sentences[max(0, i - context):i]), sentences[i], pool))
    if len(candidates) < count:
        raise CloverError(f"the text has {len(candidates)} sentences with a context and {choices - 1} others from "
                          f"the same article, fewer than the {count} asked: ask for fewer documents")
    rng = random.Random(seed)
    docs = []
    for before, truth, pool in rng.sample(candidates, count):
        options = rng.sample([s for s in pool if s != truth], choices - 1)  # a sentence repeated elsewhere: not twice
        label = rng.randrange(choices)
        options.insert(label, truth)
        docs.append({"question": before, "choices": options, "label": label})
    return docs
