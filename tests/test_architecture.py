"""The package's architecture, read from its source with ``ast``: one package per pipeline stage, imports pointing
only down the stages, and no import cycle (imports inside functions and ``TYPE_CHECKING`` blocks count)."""

from __future__ import annotations

import ast
from pathlib import Path

import moeaudit

SRC = Path(moeaudit.__file__).resolve().parent

#: The stages, lowest first. A module may import modules of its own stage or of an earlier one, never of a later
#: one. A unit is a root module or a top-level package; ``__main__`` modules are entry points and may import
#: anything. The façade ``moeaudit`` (``__init__``) exports lazily by name, so statically it imports nothing.
STAGES: list[set[str]] = [
    {"moeaudit", "errors", "_atomic", "_flatconfig", "builtin"},  # foundation: shared by every stage
    {"models", "corpus"},  # loading a model (all family facts) and a corpus
    {"config"},  # frozen run configurations (they name model dtypes and loading options)
    {"stats", "testing"},  # pure statistics; tiny models for tests
    {"intervene"},  # ablation semantics, naive and fast engines, verification
    {"observation"},  # observational criteria per layer and expert
    {"experiments", "pruning", "bench"},  # the audit's experiments; pruning's algorithms; the engine benchmark
    {"rundir"},  # run directories: the storage every later stage reads and writes
    {"report"},  # tables, figures, verdict, Markdown/HTML from a run directory
    {"run"},  # a command end to end: preflight, pipeline, execution, prune-eval / map / attribute runs
    {"cli"},  # the typer app
]
#: At most this many modules at the root beside ``__init__`` and ``__main__``: the root is the public façade.
MAX_ROOT_MODULES = 8


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """``{module: {imported moeaudit modules}}`` from every ``import`` statement of the source, wherever it is."""
    files = {module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import moeaudit.x.y` names a module; trim attributes
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


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
        for w in sorted(graph.get(v, ())):
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


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def stage_violations(graph: dict[str, set[str]], stages: list[set[str]]) -> list[str]:
    """Each import of a later stage's module, and each unit that no stage names."""
    rank = {u: i for i, members in enumerate(stages) for u in members}
    problems = sorted(f"{unit(m)} has no stage in STAGES (add it where it belongs)"
                      for m in graph if unit(m) not in rank and not m.endswith("__main__"))
    for source, targets in sorted(graph.items()):
        if source.endswith("__main__") or unit(source) not in rank:
            continue
        for target in sorted(targets):
            if unit(target) in rank and rank[unit(target)] > rank[unit(source)]:
                problems.append(f"{source} (stage {rank[unit(source)]}) imports {target} "
                                f"(stage {rank[unit(target)]}, later)")
    return sorted(set(problems))


def test_the_source_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_stages():
    problems = stage_violations(import_graph(), STAGES)
    assert not problems, "\n".join(problems)


def test_the_root_keeps_only_the_facade():
    root = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules at the root: {root}"


def test_the_checks_find_a_planted_cycle_and_a_planted_violation(tmp_path):
    pkg = tmp_path / "moeaudit"
    (pkg / "run").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from moeaudit.run import pipeline\n")  # inside a function
    (pkg / "run" / "pipeline.py").write_text("from moeaudit.errors import f\nfrom . import _prepare\n")
    (pkg / "run" / "_prepare.py").write_text("import moeaudit.run.pipeline\n")
    graph = import_graph(pkg)
    assert graph["moeaudit.run.pipeline"] == {"moeaudit.errors", "moeaudit.run._prepare"}
    assert cycles(graph) == [["moeaudit.errors", "moeaudit.run._prepare", "moeaudit.run.pipeline"]]
    problems = stage_violations(graph, [{"moeaudit", "errors"}, {"run"}])
    assert problems == ["moeaudit.errors (stage 0) imports moeaudit.run.pipeline (stage 1, later)"]
    assert stage_violations(graph, [{"moeaudit", "errors"}]) == ["run has no stage in STAGES (add it where it belongs)"]
