"""Wall time of a two-point train sweep through `dvc queue`: one worker, two workers with torch's default threads
(every core each), and two workers with OMP_NUM_THREADS = cores / 2 (docs/experiments.md).

Run from the repo root with the venv active:
    python bench/sweep.py [--rows 32] [--epochs 4]
It copies the repo (tracked and untracked files) to a temporary git repo, cuts data/sample to --rows training rows,
runs `dvc repro` once (not timed), then queues two learning rates per setting (new ones each time, so neither the
run-cache nor an earlier experiment answers) and times `dvc queue start` until the queue is empty. Prints a table.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1
SETTINGS = [  # (name, workers, OMP_NUM_THREADS or None for torch's default)
    ("-j 1, default threads", 1, None),
    ("-j 2, default threads", 2, None),
    (f"-j 2, OMP_NUM_THREADS={max(1, CORES // 2)}", 2, max(1, CORES // 2)),
]


def sh(*cmd, cwd, env=None) -> str:
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def copy_repo(dest: Path, rows: int, epochs: int) -> None:
    files = sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for split, n in {"train": rows, "dev": max(4, rows // 3), "test": max(4, rows // 3)}.items():
        path = dest / "data" / "sample" / f"{split}.csv"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[: n + 1]))
    train_conf = dest / "conf" / "train" / "default.yaml"
    lines = [f"num_epochs: {epochs}" if line.startswith("num_epochs:") else line
             for line in train_conf.read_text().splitlines()]  # fmt: skip
    train_conf.write_text("\n".join(lines) + "\n")
    sh(sys.executable, "-m", "nlistral", "params", cwd=dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        sh(*cmd, cwd=dest)


def queue_busy(root: Path) -> bool:
    rows = sh("dvc", "queue", "status", cwd=root).splitlines()
    return any(line.split()[-1:] in (["Queued"], ["Running"]) for line in rows)


def timed_sweep(root: Path, workers: int, threads: int | None, rates: list[float]) -> float:
    for rate in rates:
        sh("dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}", cwd=root)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    sh("dvc", "queue", "start", "-j", str(workers), cwd=root, env=env)
    while queue_busy(root):
        time.sleep(1)
    wall = time.perf_counter() - start
    failed = [line for line in sh("dvc", "queue", "status", cwd=root).splitlines() if line.endswith("Failed")]
    if failed:
        sys.exit(f"failed experiments: {failed} (see `dvc queue logs <name>` in {root})")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="training rows (dev and test get a third)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nlistral-sweep-"))
    copy_repo(root, args.rows, args.epochs)
    start = time.perf_counter()
    sh("dvc", "repro", cwd=root)
    print(f"{CORES} cores; setup `dvc repro` {time.perf_counter() - start:.0f} s ({root})")
    print(f"{'setting':32} {'two experiments, wall s':>24}")
    for i, (name, workers, threads) in enumerate(SETTINGS):
        rates = [1e-3 * (2 * i + 3), 1e-3 * (2 * i + 4)]  # 3e-3, 4e-3, then 5e-3, 6e-3 ... (the default is 2e-3)
        print(f"{name:32} {timed_sweep(root, workers, threads, rates):>24.0f}", flush=True)
    sh("dvc", "queue", "stop", cwd=root)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
