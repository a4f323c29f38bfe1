"""Atomic file writes (a stage's output either appears complete or not at all), metrics files with their timings
kept apart (`write_metrics`), and content digests of folders."""

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nlistral.errors import DataError
from nlistral.paths import SPEED_DIR, SPEED_KEYS


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
    """The records of a JSONL file one at a time (a stage that passes rows through never holds the file). A line
    that is not a JSON object (a file cut short) or not UTF-8 is a DataError naming the file and line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x})", number) from None
            if line.strip():
                yield json_record(line, path, number)


def parse_jsonl(text: str, path) -> list[dict]:
    """The records of JSONL `text` read from `path` (for messages). Lines end at \\n alone: str.splitlines also
    breaks at U+2028, U+0085 and others, which json.dumps(ensure_ascii=False) leaves raw inside strings."""
    return [json_record(line, path, number) for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def json_record(line: str, path, number: int | None = None) -> dict:
    """One JSON object (a JSONL line, or a whole JSON file), or a DataError naming `path` and the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        where, column = (number, err.pos + 1) if number is not None else (err.lineno, err.colno)
        raise DataError(path, f"not JSON ({err.msg} at column {column}): cut short or edited?", where) from None
    if not isinstance(record, dict):
        raise DataError(path, f"not a JSON object (a {type(record).__name__})", number)
    return record


def read_json(path) -> dict:
    """A JSON object file (a metrics file), or a DataError naming it and the line where it stops being JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte 0x{err.object[err.start]:02x})") from None
    return json_record(text, path)


def read_jsonl(path) -> list[dict]:
    return list(iter_jsonl(path))


def write_json(path, data) -> None:
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def content_digest(*dirs) -> str:
    """sha256 over every file (relative path and bytes) in `dirs`: a retrained adapter or rebuilt base differs."""
    digest = hashlib.sha256()
    for folder in map(Path, dirs):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def speed_path(metrics_path) -> Path:
    """Where a metrics file's timings go: metrics/X.json -> metrics/speed/X.json (paths.SPEED_DIR)."""
    path = Path(metrics_path)
    top = next(folder for folder in path.parents if folder.name == SPEED_DIR.parent.name)
    return top / SPEED_DIR.name / path.relative_to(top)


def write_metrics(path, metrics: dict) -> None:
    """A stage's metrics file, less its timings (paths.SPEED_KEYS), which go to `speed_path`."""
    write_json(path, {k: v for k, v in metrics.items() if k not in SPEED_KEYS})
    if speed := {k: v for k, v in metrics.items() if k in SPEED_KEYS}:
        write_json(speed_path(path), speed)


def read_metrics(path) -> dict:
    """A metrics file with its timings (if any): what the stage that wrote it returned."""
    speed = speed_path(path)
    timings = json.loads(speed.read_text(encoding="utf-8")) if speed.is_file() else {}
    return json.loads(Path(path).read_text(encoding="utf-8")) | timings


def write_csv(path, rows: list[dict], fieldnames) -> None:
    """Rows -> CSV with a header, also when there are no rows (dvc plots reads these)."""
    with atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
