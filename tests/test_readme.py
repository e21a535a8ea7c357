"""Every Python call the README documents works as written (a snippet that raises AttributeError is a broken promise).

Static for every snippet: each ``clover...`` name it imports or reaches through attributes resolves after the
snippet's own imports. The main API snippet also runs for real on SmolLM2 (real_model tier).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def clover_names(snippet: str) -> list[tuple[str, list[str]]]:
    """(how it is reached, dotted path) for every clover name the snippet uses: imports and attribute chains."""
    tree = ast.parse(snippet)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "clover":
            names += [("from-import", [*node.module.split("."), alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [("import", alias.name.split(".")) for alias in node.names if alias.name.startswith("clover")]
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] == "clover":
                names.append(("attribute", chain))
    return names


def test_readme_has_python_snippets():
    assert len(python_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_every_documented_clover_name_resolves(index):
    snippet = python_snippets()[index]
    for how, path in clover_names(snippet):
        if how == "import":
            importlib.import_module(".".join(path))
            continue
        if how == "from-import":  # `from clover.x import y`: y is an attribute or a submodule of clover.x
            owner = importlib.import_module(".".join(path[:-1]))
            if not hasattr(owner, path[-1]):
                importlib.import_module(".".join(path))
            continue
        # `clover.a.b` after a plain `import clover`: attributes only, nothing imported on the way
        obj = importlib.import_module("clover")
        for depth, part in enumerate(path[1:], 1):
            assert hasattr(obj, part), f"README snippet {index}: {'.'.join(path[:depth + 1])} does not exist " \
                                       "after `import clover`"
            obj = getattr(obj, part)


def _serve_loaded(monkeypatch, smollm2, copy: bool) -> None:
    """``load("smollm2-135m")`` in a snippet returns the session's model (a copy where the snippet rewrites it in
    place) instead of dequantizing the GGUF again: the snippet runs as written, without a second 20 s load."""
    import copy as copying

    from clover import models

    real = models.load

    def load(name, *args, **kwargs):
        if name == "smollm2-135m" and not args and not kwargs:
            return copying.deepcopy(smollm2) if copy else smollm2
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models, "load", load)


@pytest.mark.real_model
def test_main_api_snippet_runs_as_written(smollm2, tmp_path, monkeypatch):
    snippet = next(s for s in python_snippets() if 'load("smollm2-135m")' in s)
    _serve_loaded(monkeypatch, smollm2, copy=True)  # orthogonalize_ rewrites it in place
    monkeypatch.chdir(tmp_path)  # it saves to out/x
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "x" / "config.json").is_file()
    assert (tmp_path / "out" / "x-full" / "tokenizer.json").is_file()
    assert namespace["report"].layers and namespace["pruned"].config.model_type == "clover_llama"


@pytest.mark.real_model
def test_latent_snippet_runs_as_written(smollm2, monkeypatch):
    snippet = next(s for s in python_snippets() if "to_latent" in s)
    _serve_loaded(monkeypatch, smollm2, copy=False)  # to_latent leaves its input as it was
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report.kv_bytes_per_token_after * 2 == report.kv_bytes_per_token_before
    assert namespace["latent"].config.model_type == "clover_latent_llama"
