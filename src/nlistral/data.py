"""CSV input contract: `{data_dir}/{split}.csv` -> DataFrame(id, premise, hypothesis, label), or a DataError.

Columns: `premise`, `hypothesis`, `label` are required; `id` is optional (default: the 0-based row index as str);
other columns are ignored unless named as tag columns (test sets: `read_csv(path, tags=("phenomenon",))` keeps
them, as strings; a missing tag column or an empty tag is an error). Decisions:
- label is exactly `0` or `1` (surrounding spaces allowed); `0.0`/`1.0`, `yes`, `2`, `-1` and empty are errors,
  so a label column that went through floats or another label scheme is caught rather than guessed at.
- premise/hypothesis are kept exactly as written (no stripping); empty or whitespace-only text is an error.
- ids are kept as written; empty or duplicate ids are errors. Header names are matched after stripping spaces.
- UTF-8 only (a BOM is fine); quoted fields may span lines.
"""

import csv
import io
from pathlib import Path

import pandas as pd

from nlistral.errors import DataError

REQUIRED = ("premise", "hypothesis", "label")
LABELS = {"0": 0, "1": 1}


def load_split(data_dir, split) -> pd.DataFrame:
    return read_csv(Path(data_dir) / f"{split}.csv")


def read_csv(path, tags=()) -> pd.DataFrame:
    """The CSV at `path` -> DataFrame(id, premise, hypothesis, label, *tags), or a DataError (see module doc)."""
    path, tags = Path(path), tuple(tags)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(path, f"cannot read file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x})", line) from None

    # The csv module, not pandas: pandas cannot say which physical line a record came from. reader.line_num counts
    # lines consumed so far, so a record starts one line after the previous record ended, quoted newlines included.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 1
    try:
        for fields in reader:
            if fields:  # blank lines are skipped
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(path, f"malformed CSV ({err})", start) from None
    if not records:
        raise DataError(path, "empty file (no header)")

    header = [name.strip() for name in records[0][1]]
    for name in tags:
        if name in ("id", *REQUIRED):
            raise DataError(path, "is a data column, not a tag column", 1, name)
    for name in ("id", *REQUIRED, *tags):
        if header.count(name) > 1:
            raise DataError(path, "appears more than once in the header", 1, name)
    for name in (*REQUIRED, *tags):
        if name not in header:
            raise DataError(path, f"missing from the header (found: {', '.join(header)})", 1, name)
    if len(records) == 1:
        raise DataError(path, "no data rows after the header")
    col = {name: header.index(name) for name in ("id", *REQUIRED, *tags) if name in header}

    rows, first_line = [], {}
    for index, (line, fields) in enumerate(records[1:]):
        if len(fields) != len(header):
            raise DataError(path, f"expected {len(header)} fields like the header, got {len(fields)}", line)
        row = {name: fields[i] for name, i in col.items()}
        row.setdefault("id", str(index))
        for name in ("id", "premise", "hypothesis", *tags):
            if not row[name].strip():
                raise DataError(path, "empty value", line, name)
        label = row["label"].strip()
        if label not in LABELS:
            raise DataError(path, f"expected 0 or 1, got {row['label']!r}", line, "label")
        row["label"] = LABELS[label]
        if row["id"] in first_line:
            raise DataError(path, f"duplicate id {row['id']!r} (first on line {first_line[row['id']]})", line, "id")
        first_line[row["id"]] = line
        rows.append(row)
    return pd.DataFrame(rows, columns=["id", *REQUIRED, *tags]).astype({"id": str, "label": "int64"})
