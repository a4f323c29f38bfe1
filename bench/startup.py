"""Start-up cost of each `nlistral` command: the seconds a fresh interpreter takes to import what the command
imports (cli + its module), median of --runs, and the heavy packages that pulls in.

    .venv/bin/python bench/startup.py [--runs 3]

Run it on an idle machine; on PYTHONDONTWRITEBYTECODE=1 machines an uncompiled venv shows here (see Makefile setup).
"""

import argparse
import json
import statistics
import subprocess
import sys

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "mlflow", "datasets", "scipy", "pandas",
         "matplotlib", "dvc", "hydra", "requests")  # fmt: skip
COMMANDS = {
    "--help": [],
    "params": ["nlistral.config"],
    "estimate": ["nlistral.estimate"],
    "compare": ["nlistral.compare"],
    "prepare": ["nlistral.stages.prepare"],
    "thoughts": ["nlistral.stages.thoughts"],
    "reflections": ["nlistral.stages.reflections"],
    "sft": ["nlistral.stages.sft"],
    "base-model": ["nlistral.stages.base_model"],
    "train": ["nlistral.stages.train"],
    "evaluate": ["nlistral.stages.evaluate"],
    "evaluate-base": ["nlistral.stages.evaluate_base"],
    "evaluate-teacher": ["nlistral.stages.evaluate_teacher"],
    "report": ["nlistral.stages.report"],
}
PROBE = """
import json, sys, time
start = time.perf_counter()
import nlistral.cli
for name in sys.argv[1:]:
    __import__(name)
seconds = time.perf_counter() - start
print(json.dumps({"s": seconds, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def measure(modules: list[str]) -> tuple[float, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    return result["s"], [m for m in HEAVY if m in result["modules"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    print(f"{'command':18} {'import s':>9}  heavy packages loaded")
    for command, modules in COMMANDS.items():
        times, heavy = [], []
        for _ in range(runs):
            seconds, heavy = measure(modules)
            times.append(seconds)
        print(f"{command:18} {statistics.median(times):9.2f}  {', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
