"""Generation throughput against a provider's rate limit.

A loopback server (tests/llm_server.py) admits R chat requests in any 1 s window (429 with Retry-After beyond) and
answers after ~300 ms. For each (R, max_concurrency) the real engine (mistral backend, requests_per_second=R, a fresh
reply cache) runs stage 1's requests for R x --seconds rows, and the table shows the admitted request rate / R
(steady state, at the server), the 429s received, rows/s end to end, and rows lost (not recorded exactly once as
ok or failed; must be 0).
The "off" rows run without the client-side limit, to show what the limiter saves.

    .venv/bin/python bench/generation.py [--seconds 10]
"""

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")

from llm_server import LLMServer, many_rows  # noqa: E402

from nlistral.config import compose_params  # noqa: E402
from nlistral.llm.engine import Task, generate  # noqa: E402
from nlistral.prompts import teacher_messages  # noqa: E402
from nlistral.stages.thoughts import check_thought  # noqa: E402

LATENCY_S = 0.3
# (R, max_concurrency, client-side limit on): enough concurrency needs R x latency requests in flight
RUNS = [(2, 1, True), (2, 4, True), (10, 2, True), (10, 8, True), (10, 8, False), (50, 8, True), (50, 32, True)]


def lost_rows(task_ids, outcomes) -> int:
    """Rows not recorded exactly once, as ok (a value) or failed (a reason): missing, or recorded twice."""
    recorded = Counter(o.id for o in outcomes if o.value is not None or o.reason is not None)
    return sum(recorded[i] != 1 for i in task_ids)


def run_once(rate: int, concurrency: int, limited: bool, seconds: float) -> dict:
    rows = many_rows(int(rate * seconds))
    tasks = [Task(str(i), teacher_messages(p, h), check_thought, 2) for i, (p, h, _) in enumerate(rows)]
    cfg = OmegaConf.create(compose_params(["teacher=mistral"], REPO / "conf")).teacher  # inherits conf/llm/
    with LLMServer(latency=LATENCY_S, rate=rate, models=[cfg.model]) as server, tempfile.TemporaryDirectory() as cache:
        cfg.base_url = server.url
        cfg.max_concurrency = concurrency
        cfg.requests_per_second = rate if limited else 0
        outcomes, stats = generate(cfg, tasks, desc="bench", cache_dir=cache)
        admitted = server.admitted
    failed = sum(o.value is None and o.reason is not None for o in outcomes)
    steady_rate = (len(admitted) - 1) / (admitted[-1] - admitted[0])
    return {
        "R": rate,
        "concurrency": concurrency,
        "client limit": "on" if limited else "off",
        "rows": len(rows),
        "throughput / R": f"{steady_rate / rate:.3f}",
        "429s": stats["http_429"],
        "rows/s": f"{len(rows) / stats['wall_s']:.2f}",
        "wall s": f"{stats['wall_s']:.1f}",
        "lost": lost_rows([t.id for t in tasks], outcomes),
        "failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="rows per run = R x seconds")
    args = parser.parse_args()
    os.environ.setdefault("MISTRAL_API_KEY", "bench-key")  # the loopback server takes any key
    results = [run_once(rate, conc, limited, args.seconds) for rate, conc, limited in RUNS]
    header = list(results[0])
    print(f"latency {LATENCY_S * 1000:.0f} ms; server admits R requests in any 1 s window\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for result in results:
        print("| " + " | ".join(str(result[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
