import logging
import os
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

# One math thread per process: the tiny models gain nothing from more, and test processes (stages under
# `dvc repro`, DDP ranks) then do not oversubscribe the 2 cores CI has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Files with end-to-end (`slow`) tests run first: on `make test`'s two pytest-xdist workers (--dist loadfile,
    which hands out files in this order) the longest files start at once rather than last, beside the short ones."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort: each file's order is kept


def copy_checkout(dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """The repository's files as a clone would have them (tracked, or untracked and not ignored), copied to `dest`,
    less the paths starting with one of `skip`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    for name in files:
        if (REPO / name).is_file() and not name.startswith(skip):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((REPO / name).read_bytes())
    return dest


def doc_pages() -> list[Path]:
    """README.md (the entrance) and the docs/ pages its sections moved to."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_section(heading: str) -> str:
    """The text of the `## <heading>...` section (a heading starting so) in README.md or the docs/ page holding it."""
    for page in doc_pages():
        parts = re.split(rf"(?m)^## {re.escape(heading)}.*$", page.read_text(), maxsplit=1)
        if len(parts) == 2:
            return parts[1].split("\n## ", 1)[0]
    raise AssertionError(f"no '## {heading}' section in README.md or docs/")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repo (real data for tests); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temporary repo root holding conf/ and params.yaml, as the CLI expects; cwd is set to it."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NLISTRAL_CACHE_DIR", str(tmp_path / ".cache" / "llm"))
    return tmp_path


@pytest.fixture(scope="session")
def built_base(tmp_path_factory) -> Path:
    """models/base of the embedded profile (the tiny model and its tokenizer), built once for the session."""
    from nlistral.config import load_config
    from nlistral.stages import base_model

    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        base_model.run(load_config())
    return root / "models" / "base"


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests that run DVC in-process leave variables such as DVC_ROOT behind; no test sees another's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """An in-process `cli.main` (logging.basicConfig) or DVC call leaves stream handlers on the test's captured
    stderr, closed once that test ends; a later test's DVC logging would fail on them."""
    yield
    for name in ("", "dvc"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                logger.removeHandler(handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(cmd: list[str], url: str, what: str, **popen):
    """`cmd` started as a server; yields once `url`/health answers (checked while it lives, generous deadline);
    terminated afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{url}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


def paired_by_hand(a_rows, b_rows, a_name: str, b_name: str, resamples: int, seed: int) -> dict:
    """A comparison object of B against A computed here, not with nlistral.results: rows matched by id in A's
    order, accuracies and discordant counts by hand, the exact McNemar p-value from scipy and its mid-p from
    binomial sums, the paired bootstrap intervals from nlistral.stats (its own tests pin them)."""
    from math import comb

    from scipy.stats import binomtest

    from nlistral.stats import macro_f1_difference, paired_comparison

    b_by_id = {str(r["id"]): r for r in b_rows}
    assert sorted(b_by_id) == sorted(str(r["id"]) for r in a_rows)
    a = [bool(r["correct"]) for r in a_rows]
    b = [bool(b_by_id[str(r["id"])]["correct"]) for r in a_rows]
    right_wrong, wrong_right = (
        sum(x and not y for x, y in zip(a, b, strict=True)),
        sum(y and not x for x, y in zip(a, b, strict=True)),
    )
    discordant = right_wrong + wrong_right
    by_hand = {
        "a": a_name, "b": b_name, "n": len(a), "accuracy_a": round(sum(a) / len(a), 4),
        "accuracy_b": round(sum(b) / len(b), 4), "difference": round((sum(b) - sum(a)) / len(a), 4),
        "mcnemar_p": float(binomtest(wrong_right, discordant, 0.5).pvalue) if discordant else 1.0,
        "a_right_b_wrong": right_wrong, "a_wrong_b_right": wrong_right,
    }  # fmt: skip
    m = min(right_wrong, wrong_right)
    tail = sum(comb(discordant, k) for k in range(m)) + comb(discordant, m) / 2  # P(X < m) + P(X = m) / 2, x 2^d
    by_hand["mcnemar_midp"] = min(1.0, 2 * tail / 2**discordant) if discordant else 1.0
    labels = [r["true_label"] for r in a_rows], [r["predicted_label"] for r in a_rows]
    by_hand |= macro_f1_difference(*labels, [b_by_id[str(r["id"])]["predicted_label"] for r in a_rows], resamples, seed)
    return by_hand | {"difference_ci95": paired_comparison(a, b, resamples, seed)["difference_ci95"]}
