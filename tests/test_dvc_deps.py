"""Each dvc.yaml stage's source deps are exactly the files its code imports, so a code change re-runs what it can
change and nothing else.

A stage runs `nlistral <command>`: cli.py parses the arguments and imports `nlistral.stages.<command>`. Its deps are
the import closure (every `import`, lazy ones too, read with `ast`) of that module and of cli.py's module-level
imports, within src/nlistral. cli.py itself is left out: it only dispatches, and what it calls into is counted.
A package's `__init__.py` counts when it holds code (a docstring-only one does nothing). Non-Python deps (the report
templates) are not checked here.
"""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "nlistral"


def module_file(name: str) -> Path | None:
    """src/ file of a `nlistral...` module or package; None for anything else (a name inside a module)."""
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(file: Path, toplevel_only: bool = False) -> set[str]:
    """The `nlistral...` modules a file imports (for `from a import b`: a.b if that is a module, else a)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    nodes = tree.body if toplevel_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "nlistral" and module_file(name)}


def holds_code(init: Path) -> bool:
    body = ast.parse(init.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def closure(roots: set[str]) -> set[str]:
    """Repo-relative files run when `roots` are imported: their imports, transitively, and their packages."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            module = ".".join(parts[:depth])
            if module not in seen:
                seen.add(module)
                todo.extend(imported_modules(module_file(module)))
    files = {module_file(m) for m in seen}
    return {str(f.relative_to(REPO)) for f in files if f.name != "__init__.py" or holds_code(f)}


def derived_deps(command: str) -> set[str]:
    stage_module = f"nlistral.stages.{command.replace('-', '_')}"
    assert module_file(stage_module), f"`nlistral {command}` has no module {stage_module}"
    return closure({stage_module} | imported_modules(PACKAGE / "cli.py", toplevel_only=True))


def listed_deps(deps: list) -> set[str]:
    """The .py files a stage's deps name (a folder: every .py file in it)."""
    files = set()
    for dep in deps:
        dep = next(iter(dep)) if isinstance(dep, dict) else dep
        path = REPO / dep
        if not dep.startswith("src/"):
            continue
        files |= {str(p.relative_to(REPO)) for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return {f for f in files if f.endswith(".py")}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_are_its_import_closure(stage):
    body = STAGES[stage].get("do", STAGES[stage])
    program, command = body["cmd"].split()[:2]
    assert program == "nlistral", f"{stage}: cmd does not run nlistral: {body['cmd']}"
    derived, listed = derived_deps(command), listed_deps(body.get("deps", []))
    missing, extra = sorted(derived - listed), sorted(listed - derived)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage}: missing deps {missing}, extra deps {extra}; its code deps are:\n"
        + "\n".join(f"        - {f}" for f in sorted(derived))
    )


def test_closure_follows_lazy_imports_and_packages():
    """The LLM client factory imports its backends inside a function: a stage that uses it depends on all of them.
    The LLM stages never reach the model code (a lazy `import nlistral.model` in thoughts would fail here), so a
    change to it re-runs no teacher calls."""
    deps = derived_deps("thoughts")
    assert {"src/nlistral/llm/offline.py", "src/nlistral/llm/http.py", "src/nlistral/llm/replay.py"} <= deps
    assert "src/nlistral/cli.py" not in deps
    model_code = {"src/nlistral/model.py", "src/nlistral/evaluation.py", "src/nlistral/stages/train.py"}
    assert all(f in derived_deps("evaluate") for f in model_code - {"src/nlistral/stages/train.py"})
    assert not deps & model_code and not derived_deps("reflections") & model_code
