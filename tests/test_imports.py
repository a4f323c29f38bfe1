"""Commands import what they use: the LLM and report commands load no deep-learning stack, `--help` not even pandas.

Each command runs for real (in a fresh interpreter, on the sample data with the offline backends) and reports the
top-level packages it loaded. `report` and `compare` read a whole pipeline's outputs: `compare` runs on two small
predictions files; `report` runs on a whole pipeline's outputs in test_report.py.
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEEP_LEARNING = {"torch", "transformers", "trl", "peft", "bitsandbytes"}
HEAVY = DEEP_LEARNING | {"scipy", "pandas", "mlflow", "datasets", "matplotlib"}

RUN_AND_LIST = """
import contextlib, io, json, sys
from nlistral import cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = cli.main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
heavy = json.loads(sys.stdin.read())
print(json.dumps({"exit": code, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(heavy))}))
"""


def loaded_by(cwd: Path, *args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, *args], cwd=cwd, input=json.dumps(sorted(HEAVY)),
                          capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit"] == 0, (args, done.stderr[-2000:])
    return set(result["loaded"])


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imports")
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
    predictions = [{"id": str(i), "premise": "p", "hypothesis": f"h{i}", "true_label": i % 2,
                    "predicted_label": 1, "correct": i % 2 == 1} for i in range(6)]  # fmt: skip
    for name in ("a.jsonl", "b.jsonl"):
        (root / name).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return root


def test_help_imports_no_pandas_scipy_or_deep_learning(sample_root):
    assert loaded_by(sample_root, "--help") == set()


@pytest.mark.parametrize(
    "args",
    [
        ("thoughts", "--split", "dev"),
        ("reflections", "--split", "dev"),  # after thoughts (parametrize keeps this order)
        ("estimate", "--split", "dev"),
        ("evaluate-teacher", "eval.limit=5"),
        ("compare", "a.jsonl", "b.jsonl", "--bootstrap", "200"),
    ],
    ids=lambda args: args[0],
)
def test_llm_and_scoring_commands_import_no_deep_learning(sample_root, monkeypatch, args):
    monkeypatch.setenv("NLISTRAL_CACHE_DIR", str(sample_root / "cache"))
    assert not loaded_by(sample_root, *args) & DEEP_LEARNING


COMMANDS = {"nlistral.compare", "nlistral.summary", "nlistral.experiments", "nlistral.export", "nlistral.cli"}


def nlistral_imports(file: Path) -> set[str]:
    """Every `nlistral...` name a module imports, lazy imports included (for `from a import b`: a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("nlistral")}


def test_imports_go_down_only():
    """Commands never reach into stage modules, stages never into commands, schema.py never into config.py (which
    calls it): what both sides need lives in a lower module (results, scoring, stats, errors). Guards the seams of
    issue 32: summary.py took MODEL_NAMES/test_results from stages/report.py, the evaluate stages took
    compare_records from compare.py, and config.py/schema.py imported each other."""
    package = REPO / "src" / "nlistral"
    wrong = []
    for file in sorted(package.rglob("*.py")):
        module = "nlistral." + ".".join(file.relative_to(package).with_suffix("").parts)
        imports = nlistral_imports(file)
        if module.startswith("nlistral.stages."):
            wrong += [f"{module} -> {name}" for name in imports if name in COMMANDS]
        elif module != "nlistral.cli":
            wrong += [f"{module} -> {name}" for name in imports if name.startswith("nlistral.stages")]
    schema = nlistral_imports(package / "schema.py")
    wrong += [f"nlistral.schema -> {name}" for name in schema if name.startswith("nlistral.config")]
    assert not wrong, wrong
