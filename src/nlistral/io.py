"""Atomic file writes: a stage's output either appears complete or not at all."""

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file beside `path`, then rename it over `path` on success (durably, usual mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the mode any new file would
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl(path, records) -> int:
    """One JSON object a line. A file of no records holds one empty line: DVC warns about every 0-byte output
    (`failed` and `suspect` files are usually empty), and JSONL readers skip blank lines (`read_jsonl` does)."""
    count = 0
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        if not count:
            handle.write("\n")
    return count


def iter_jsonl(path) -> Iterator[dict]:
    """The records of a JSONL file one at a time (a stage that passes rows through never holds the file)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path) -> list[dict]:
    return list(iter_jsonl(path))


def write_json(path, data) -> None:
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_csv(path, rows: list[dict], fieldnames) -> None:
    """Rows -> CSV with a header, also when there are no rows (dvc plots reads these)."""
    with atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
