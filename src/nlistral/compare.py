"""`nlistral compare A B`: is B really better than A? A paired comparison of two runs' predictions on the same rows.

A and B are predictions*.jsonl files, or git revisions / `dvc exp` experiment names whose predictions are read
through `dvc.api` (from the DVC cache or remote), so `nlistral compare main exp-abc12` works after `dvc exp run`.
Rows are matched by id; two files that do not hold the same test rows are an error that says what differs.
"""

import json
from pathlib import Path

from nlistral.confidence import ece_difference
from nlistral.formatting import pvalue, terminal
from nlistral.io import atomic_open, parse_jsonl, read_jsonl
from nlistral.paths import PREDICTIONS
from nlistral.results import CompareError, compare_records

SHOWN_FLIPS = 20


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
    return parse_jsonl(text, f"{path} at {spec}")


def describe(result: dict) -> str:
    """The comparison as a few lines of text."""
    a, b = result["a"], result["b"]
    low, high = result["difference_ci95"]
    lines = [
        f"A = {a}: accuracy {result['accuracy_a']:.4f}",
        f"B = {b}: accuracy {result['accuracy_b']:.4f}   ({result['n']} paired rows)",
        f"B - A = {result['difference']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] (paired bootstrap)",
        f"McNemar exact p = {pvalue(result['mcnemar_p'])}, mid-p = {pvalue(result['mcnemar_midp'])}",
        f"A right, B wrong: {result['a_right_b_wrong']}   A wrong, B right: {result['a_wrong_b_right']}",
    ]
    if result.get("macro_f1_difference") is not None:  # when both files hold predicted labels
        f1_low, f1_high = result["macro_f1_difference_ci95"]
        lines.insert(3, f"macro F1: B - A = {result['macro_f1_difference']:+.4f}, 95% CI [{f1_low:+.4f}, "
                        f"{f1_high:+.4f}] (paired bootstrap)")  # fmt: skip
    if (ece := result.get("calibration")) is not None:
        low, high = ece["ece_difference_ci95"]
        lines.append(f"ECE: B - A = {ece['ece_difference']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] (paired bootstrap "
                     f"over the {ece['n']} rows both gave a probability for)")  # fmt: skip
    else:
        lines.append("ECE: no probabilities on one side (the teacher has none)")
    flipped = result["flipped"]
    if flipped:
        shown = ", ".join(f"{f['id']} ({'right->wrong' if f['a_correct'] else 'wrong->right'})"
                          for f in flipped[:SHOWN_FLIPS])  # fmt: skip
        more = f" ... and {len(flipped) - SHOWN_FLIPS} more (--json lists all)" if len(flipped) > SHOWN_FLIPS else ""
        lines.append(f"flipped rows: {shown}{more}")
    return "\n".join(lines)


def run(a: str, b: str, json_path: str | None, path: str, resamples: int, seed: int) -> dict:
    a_rows, b_rows = load_predictions(a, path), load_predictions(b, path)
    result = compare_records(a_rows, b_rows, a, b, resamples, seed)
    result["calibration"] = ece_difference(a_rows, b_rows, resamples, seed)
    print(terminal(describe(result)))
    if json_path:
        with atomic_open(json_path) as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return result
