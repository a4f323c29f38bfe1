"""Does requirements-vllm.txt (the model server's environment, `make vllm-env`) resolve on PyPI?

    python bench/vllm_requirements.py

Runs `pip install --dry-run --ignore-installed --report` on it (installs nothing; needs the network to PyPI and
~2 min: pip reads the metadata of ~200 packages, CUDA wheels among them, which is why this is a bench script and not
a CI test) and prints the resolved vLLM, torch and transformers versions, the package count and the time taken.
Exit status 1 if it does not resolve.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements-vllm.txt"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        start = time.perf_counter()
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        done = subprocess.run([*pip, "--report", str(report), "-r", str(REQUIREMENTS)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "is ignored" not in line]
            print(f"{REQUIREMENTS.name} does not resolve ({wall:.0f} s):\n" + "\n".join(errors[-20:]))
            return 1
        installs = json.loads(report.read_text())["install"]
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
    picked = ", ".join(f"{name} {versions.get(name)}" for name in ("vllm", "torch", "transformers"))
    print(f"{REQUIREMENTS.name} resolves: {picked}; {len(versions)} packages; {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
