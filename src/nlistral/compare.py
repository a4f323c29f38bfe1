"""`nlistral compare A B`: is B really better than A? A paired comparison of two runs' predictions on the same rows.

A and B are predictions*.jsonl files, or git revisions / `dvc exp` experiment names whose predictions are read
through `dvc.api` (from the DVC cache or remote), so `nlistral compare main exp-abc12` works after `dvc exp run`.
Rows are matched by id; two files that do not hold the same test rows are an error that says what differs.
"""

import json
from pathlib import Path

from nlistral.io import atomic_open, read_jsonl
from nlistral.paths import PREDICTIONS
from nlistral.stats import paired_comparison

SHOWN_FLIPS = 20


class CompareError(ValueError):
    """The two prediction sets cannot be paired (different rows), or one cannot be read."""


def _by_id(rows, name: str) -> dict:
    by_id = {}
    for row in rows:
        key = str(row["id"])
        if key in by_id:
            raise CompareError(f"{name}: id {key} appears more than once")
        by_id[key] = row
    return by_id


def _sample(ids) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def compare_records(a_rows, b_rows, a_name: str, b_name: str, resamples: int, seed: int) -> dict:
    """The comparison object (docs/evaluation.md: Comparing runs) of B against A, matched by id, in A's order."""
    a, b = _by_id(a_rows, a_name), _by_id(b_rows, b_name)
    if a.keys() != b.keys():
        raise CompareError(
            f"{a_name} and {b_name} hold different test rows: {len(a)} vs {len(b)} rows; "
            f"only in {a_name}: {_sample(a.keys() - b.keys()) or 'none'}; "
            f"only in {b_name}: {_sample(b.keys() - a.keys()) or 'none'}"
        )
    for key in a:
        for field in ("true_label", "premise", "hypothesis"):
            if field in a[key] and field in b[key] and a[key][field] != b[key][field]:
                raise CompareError(f"row id {key}: {field} differs between {a_name} and {b_name}, "
                                   "so they are not the same test rows")  # fmt: skip
    ids = list(a)
    a_correct = [bool(a[i]["correct"]) for i in ids]
    b_correct = [bool(b[i]["correct"]) for i in ids]
    result = {"a": a_name, "b": b_name, **paired_comparison(a_correct, b_correct, resamples, seed)}
    result["flipped"] = [{"id": i, "a_correct": x, "b_correct": y}
                         for i, x, y in zip(ids, a_correct, b_correct, strict=True) if x != y]  # fmt: skip
    return result


def load_predictions(spec: str, path: str = PREDICTIONS) -> list[dict]:
    """Rows of a predictions file: `spec` itself if it is a file, else `path` at git revision / experiment `spec`."""
    if Path(spec).is_file():
        return read_jsonl(spec)
    import dvc.api  # here: importing DVC takes seconds, and a file needs none of it
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        text = dvc.api.read(path, repo=".", rev=spec)
    except (DvcException, SCMError, FileNotFoundError) as err:
        raise CompareError(f"{spec!r} is neither a file nor a revision/experiment holding {path}: {err}") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def describe(result: dict) -> str:
    """The comparison as a few lines of text."""
    a, b = result["a"], result["b"]
    low, high = result["difference_ci95"]
    lines = [
        f"A = {a}: accuracy {result['accuracy_a']:.4f}",
        f"B = {b}: accuracy {result['accuracy_b']:.4f}   ({result['n']} paired rows)",
        f"B - A = {result['difference']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] (paired bootstrap)",
        f"McNemar exact p = {result['mcnemar_p']:.4g}",
        f"A right, B wrong: {result['a_right_b_wrong']}   A wrong, B right: {result['a_wrong_b_right']}",
    ]
    flipped = result["flipped"]
    if flipped:
        shown = ", ".join(f"{f['id']} ({'right->wrong' if f['a_correct'] else 'wrong->right'})"
                          for f in flipped[:SHOWN_FLIPS])  # fmt: skip
        more = f" ... and {len(flipped) - SHOWN_FLIPS} more (--json lists all)" if len(flipped) > SHOWN_FLIPS else ""
        lines.append(f"flipped rows: {shown}{more}")
    return "\n".join(lines)


def run(a: str, b: str, json_path: str | None, path: str, resamples: int, seed: int) -> dict:
    result = compare_records(load_predictions(a, path), load_predictions(b, path), a, b, resamples, seed)
    print(describe(result))
    if json_path:
        with atomic_open(json_path) as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return result
