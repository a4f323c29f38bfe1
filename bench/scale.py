"""Per-stage cost as the data grows: wall time, peak RSS, output bytes and bytes added to git, at each size.

Run from the repo root with the venv active:
    python bench/scale.py [--source DIR] [--steps 4] [--eval-rows 32] [--json out.json] ROWS [ROWS ...]
For each ROWS it copies the repo (tracked and untracked files) to a temporary git repo and writes CSVs of the study's
shape there (train ROWS, dev and test in the study's proportion 35,597 : 1,977 : 1,972), repeating the rows of every
CSV in --source (default data/sample) with distinct ids until each split is full. It runs `dvc repro` on the embedded
profile (offline teacher and reflector, tiny model) with training capped to --steps steps and every evaluation to
--eval-rows rows, so generation and training cost stays constant and the stages that grow with the data show; then
commits the results (a result commit) and runs one train experiment (`dvc exp run -S train.learning_rate=...`, an
experiment commit). Each stage's `nlistral` command runs under a shim that records its wall time and peak RSS
(getrusage of the process tree); output bytes are the sizes dvc.lock records for the stage's outs; git bytes are
the sizes of the blobs each commit adds under the stage's outs (`other`: dvc.lock, .gitignore files, trees).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import count, islice
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY = {"train": 35597, "dev": 1977, "test": 1972}  # the study's split sizes (conf/data/study.yaml)
SHIM = """#!{python}
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen([{python!r}, "-m", "nlistral", *sys.argv[1:]])
_, status, usage = os.wait4(proc.pid, 0)
with open({log!r}, "a") as log:
    log.write(json.dumps({{"cmd": " ".join(["nlistral", *sys.argv[1:]]), "wall_s": time.perf_counter() - start,
                          "max_rss_kb": usage.ru_maxrss}}) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def sh(*cmd, cwd, env=None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def source_rows(folder: Path) -> list[dict]:
    """(premise, hypothesis, label) of every row of every CSV in `folder` with those columns."""
    rows = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if {"premise", "hypothesis", "label"} <= set(reader.fieldnames or ()):
                rows += [{k: r[k] for k in ("premise", "hypothesis", "label")} for r in reader]
    if not rows:
        sys.exit(f"no CSV with premise, hypothesis, label columns in {folder}")
    return rows


def split_sizes(train_rows: int) -> dict[str, int]:
    return {split: max(1, round(train_rows * n / STUDY["train"])) for split, n in STUDY.items()}


def write_splits(data_dir: Path, pool: list[dict], train_rows: int) -> dict[str, int]:
    """{data_dir}/{train,dev,test}.csv: `pool` repeated through the three splits, each row with a distinct id
    (`<split>-<n>`). The k-th repeat of a row says "(copy k)" after its premise, so that every pair stays distinct,
    as in the study: sft's duplicate and leak checks would otherwise drop the repeats and hide what grows."""
    sizes = split_sizes(train_rows)
    rows = ((k, row) for k in count() for row in pool)
    for split, n in sizes.items():
        with open(data_dir / f"{split}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "premise", "hypothesis", "label"], lineterminator="\n")
            writer.writeheader()
            for i, (k, row) in enumerate(islice(rows, n)):
                premise = f"{row['premise']} (copy {k})" if k else row["premise"]
                writer.writerow({**row, "id": f"{split}-{i}", "premise": premise})
    return sizes


def copy_repo(dest: Path) -> None:
    for name in sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).split():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def added_blobs(root: Path, new: str, old: str) -> list[tuple[str, str, int]]:
    """(type, path, bytes) of every object commit `new` adds to git over `old`."""
    listed = sh("git", "rev-list", "--objects", new, f"^{old}", cwd=root).splitlines()
    paths = {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else "" for line in listed}
    sizes = subprocess.run(
        ["git", "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)"],
        cwd=root,
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = []
    for line in sizes.splitlines():
        sha, kind, size = line.split()
        out.append((kind, paths[sha], int(size)))
    return out


def by_stage(blobs, outs: dict[str, list[str]]) -> dict[str, int]:
    """Bytes of the blobs under each stage's outs; the rest (dvc.lock, .gitignore files, trees, commits): other."""
    totals: dict[str, int] = {}
    for kind, path, size in blobs:
        owner = next((stage for stage, prefixes in outs.items() if kind == "blob" and any(
            path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)), "other")  # fmt: skip
        totals[owner] = totals.get(owner, 0) + size
    return totals


def measure(train_rows: int, pool: list[dict], args) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"nlistral-scale-{train_rows}-"))
    copy_repo(root)
    sizes = write_splits(root / "data" / "sample", pool, train_rows)
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.eval_steps={args.steps}",
        f"train.save_steps={args.steps}",
        f"eval.limit={args.eval_rows}",
        f"eval.test_sets.diagnostic.limit={args.eval_rows}",
    ]
    sh(sys.executable, "-m", "nlistral", "params", *overrides, cwd=root)
    bench = root / ".bench"
    (bench / "bin").mkdir(parents=True)
    log = bench / "stages.jsonl"
    shim = bench / "bin" / "nlistral"
    shim.write_text(SHIM.format(python=sys.executable, log=str(log)))
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bench / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}", "PYTHONPATH": str(root / "src"), "NLISTRAL_CACHE_DIR": str(bench / "llm"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
              for what, value in (("NAME", "nlistral-bench"), ("EMAIL", "bench@nlistral.invalid"))}}  # fmt: skip
    sh("git", "init", "-q", cwd=root)
    (root / ".git" / "info" / "exclude").write_text(".bench/\n")
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "code and data", cwd=root, env=env)

    start = time.perf_counter()
    sh("dvc", "repro", cwd=root, env=env)
    repro_wall = time.perf_counter() - start
    runs = {json.loads(line)["cmd"]: json.loads(line) for line in log.read_text().splitlines()}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    stages = {name: {"cmd": entry["cmd"], "outs": {o["path"]: o.get("size", 0) for o in entry.get("outs", [])}}
              for name, entry in lock.items()}  # fmt: skip
    outs = {name: list(s["outs"]) for name, s in stages.items()}
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "results", cwd=root, env=env)
    result_git = by_stage(added_blobs(root, "HEAD", "HEAD~1"), outs)

    log.unlink()
    start = time.perf_counter()
    # `dvc exp run` composes params.yaml from conf/ again: the caps go with it
    sets = [arg for override in ["train.learning_rate=0.003", *overrides] for arg in ("-S", override)]
    sh("dvc", "exp", "run", "-n", "bench-exp", *sets, cwd=root, env=env)
    exp_wall = time.perf_counter() - start
    exp_runs = [json.loads(line)["cmd"] for line in log.read_text().splitlines()]
    # refs/exps also holds DVC's own refs (exec/EXEC_BASELINE, ...): the experiment's ref ends with its name
    exp_ref = sh("git", "for-each-ref", "--format=%(objectname)", "refs/exps/*/*/bench-exp", cwd=root).strip()
    exp_git = by_stage(added_blobs(root, exp_ref, "HEAD"), outs)

    table = []
    for name, stage in stages.items():
        run = runs.get(stage["cmd"], {})
        table.append({"stage": name, "wall_s": run.get("wall_s"), "peak_rss_mb": run.get("max_rss_kb", 0) / 1024,
                      "output_bytes": sum(stage["outs"].values()), "git_bytes_result": result_git.get(name, 0),
                      "git_bytes_experiment": exp_git.get(name, 0) if stage["cmd"] in exp_runs else None})  # fmt: skip
    table.append(
        {
            "stage": "other",
            "wall_s": None,
            "peak_rss_mb": None,
            "output_bytes": None,
            "git_bytes_result": result_git.get("other", 0),
            "git_bytes_experiment": exp_git.get("other", 0),
        }
    )
    shutil.rmtree(root)
    return {"train_rows": train_rows, "sizes": sizes, "repro_wall_s": repro_wall, "experiment_wall_s": exp_wall,
            "git_bytes_result": sum(result_git.values()), "git_bytes_experiment": sum(exp_git.values()),
            "stages": table}  # fmt: skip


def show(result: dict) -> None:
    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    sizes = result["sizes"]
    print(
        f"\n## {sizes['train']} train / {sizes['dev']} dev / {sizes['test']} test rows: `dvc repro` "
        f"{result['repro_wall_s']:.0f} s, experiment {result['experiment_wall_s']:.0f} s; git bytes added: result "
        f"commit {result['git_bytes_result']:,}, experiment commit {result['git_bytes_experiment']:,}\n"
    )
    print("| stage | wall s | peak RSS MB | output bytes | git bytes, result commit | git bytes, experiment commit |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["stages"]:
        print(
            f"| {row['stage']} | {cell(row['wall_s'], '.1f')} | {cell(row['peak_rss_mb'], '.0f')} | "
            f"{cell(row['output_bytes'], ',')} | {row['git_bytes_result']:,} | "
            f"{cell(row['git_bytes_experiment'], ',')} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int, nargs="+", metavar="ROWS", help="train rows (dev and test: study's share)")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "sample", help="folder of CSVs to repeat")
    parser.add_argument("--steps", type=int, default=4, help="training steps (train.max_steps)")
    parser.add_argument("--eval-rows", type=int, default=32, help="rows each evaluation reads (eval.limit)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    pool = source_rows(args.source)
    results = []
    for rows in args.rows:
        results.append(measure(rows, pool, args))
        show(results[-1])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
