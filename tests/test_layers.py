"""The package's layers: folders are the layers and imports point down only; no import cycle; the
registry and the CLI load without torch.

    foundation   preftune, errors, config, timing    the error type, the config engine, the start-up clock
    core         preftune.core                       pure math (torch, numpy)
    data         preftune.data                       formats, JSONL, prompts, ratings, tokenise, collate
    models       preftune.models                     loading, sampling, rewards, tiny models
    train        preftune.train                      the loop and one file per method
    evaluation   generate, judges, compare, report, plots
    apps         preftune.annotate, preftune.experiments
    cli          preftune.cli, preftune.__main__

A module may import (at module level or inside a function) only modules of its own layer or the
layers below it. docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    ("foundation", ("preftune", "preftune.errors", "preftune.config", "preftune.timing")),
    ("core", ("preftune.core",)),
    ("data", ("preftune.data",)),
    ("models", ("preftune.models",)),
    ("train", ("preftune.train",)),
    ("evaluation", ("preftune.generate", "preftune.judges", "preftune.compare", "preftune.report",
                    "preftune.plots")),
    ("apps", ("preftune.annotate", "preftune.experiments")),
    ("cli", ("preftune.cli", "preftune.__main__")),
]


def layer_of(module: str) -> int:
    """The index of the layer a module belongs to: a name in LAYERS stands for that module and everything
    below it (the root package ``preftune`` only for itself); the longest matching name decides."""
    best, depth = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            below = module.startswith(name + ".") and name != "preftune"
            if (module == name or below) and name.count(".") > depth:
                best, depth = index, name.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return best


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the preftune modules it imports anywhere in its file (module level or in functions)."""
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (src / "preftune").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preftune"):
                for alias in node.names:  # `from preftune.core import losses` imports a module
                    name = f"{node.module}.{alias.name}"
                    targets.add(name if name in files else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("preftune"))
        graph[module] = targets - {module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
                  for src, targets in graph.items() for dst in targets if layer_of(dst) > layer_of(src))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down_a_layer() -> None:
    assert upward_imports(import_graph(SRC)) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph(SRC)) == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """A control: train importing judges, and two modules importing each other, are both reported."""
    graph = {"preftune.train.rollout": {"preftune.judges"}, "preftune.judges": {"preftune.models.load"},
             "preftune.models.load": set(), "preftune.data.a": {"preftune.data.b"},
             "preftune.data.b": {"preftune.data.a"}}
    assert upward_imports(graph) == ["preftune.train.rollout (train) imports preftune.judges (evaluation)"]
    assert cycles(graph) == [["preftune.data.a", "preftune.data.b"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("preftune.somewhere")


@pytest.mark.parametrize("module", ["preftune.cli", "preftune.train", "preftune.config", "preftune.data"])
def test_light_imports(module: str) -> None:
    """The CLI (`preftune --help`), the method registry and the config engine load without torch."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
