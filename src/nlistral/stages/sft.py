"""Stage 3: correct thoughts + verified reflections -> the fine-tuning set, with its statistics.

Hygiene, all counted by reason in metrics/sft_{split}.json:
- a (premise, hypothesis) pair repeated within the split is kept once (`duplicate`);
- a train pair that also appears in dev or test is removed from train (`leak_dev`, `leak_test`);
- a row longer than model.max_seq_length tokens (configured tokenizer) is dropped (`too_long`), or kept and
  counted (`sft.drop_too_long: false`); nothing is ever truncated.
Pairs match after case-folding and collapsing whitespace.

Label-noise audit: a row is suspect when the models resist its gold label: the teacher disagreed with it (with
agreement >= audit.min_agreement when it sampled several replies, teacher.n_samples > 1) and the reflector needed
more than one attempt to argue for it, or never did (unresolved). Suspects go to data/audit/{split}_suspect.jsonl
with the evidence; `sft.drop_suspect: true` (experiment=drop_suspect) leaves them out of the fine-tuning set.

Formats (`sft.format`, prompts.FORMATS): the rows above are chosen and filtered once, as chain-of-thought rows, then
written in the format, so every format trains on the same verified examples: `cot`, `label_first`, `label_only`
(the label task alone; `sft.label_rows: all` adds every other row of the split that has a gold label) or `multitask`
(a label-task and a rationale-task row per example). Each row names its `task`; the metrics count rows per task.
"""

import json
import random
import statistics
from collections import Counter

from nlistral import paths
from nlistral.data import load_split
from nlistral.errors import ConfigError, StageError
from nlistral.io import read_jsonl, write_csv, write_json, write_jsonl
from nlistral.model import load_tokenizer
from nlistral.prompts import check_format, completion_json, sft_text, student_chat_prompt, student_prompt
from nlistral.stats import accuracy_by_length

LENGTH_FIELDS = ("id", "source", "task", "prompt_tokens", "completion_tokens")
SOURCES = {"verified": ("original", "reflected"), "all": ("original", "reflected", "gold")}  # sft.label_rows
ACCURACY_FIELDS = ("rationale_tokens", "rows", "accuracy")


def pair_key(premise: str, hypothesis: str) -> tuple[str, str]:
    return " ".join(premise.casefold().split()), " ".join(hypothesis.casefold().split())


def sft_row(source: str, item: dict, thought: str | None, teacher_model=None, reflector_model=None,
            task: str = "cot") -> dict:  # fmt: skip
    prompt = student_prompt(item["premise"], item["hypothesis"], task)
    completion = completion_json(thought, item["true_label"], task)
    return {
        "id": str(item["id"]),
        "source": source,
        "task": task,
        "teacher_model": teacher_model,
        "reflector_model": reflector_model,
        "label": item["true_label"],
        "premise": item["premise"],
        "hypothesis": item["hypothesis"],
        "prompt": prompt,
        "completion": completion,
        "text": sft_text(prompt, completion),
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
    }


def candidates(thought_rows, reflection_rows, include_reflections: bool) -> list[dict]:
    rows = [sft_row("original", t, t["thought_process"], t.get("model")) for t in thought_rows if t["correct"]]
    if include_reflections:
        rows += [
            sft_row("reflected", r, r["improved_thought_process"], r.get("teacher_model"), r.get("model"))
            for r in reflection_rows
            if r["verified"]
        ]
    return rows


def gold_rows(data_dir, split: str, explained: list[dict]) -> list[dict]:
    """sft.label_rows=all: label-task rows (source `gold`) for the split's rows no candidate explains."""
    have = {r["id"] for r in explained}
    return [
        sft_row(
            "gold",
            {"id": r.id, "premise": r.premise, "hypothesis": r.hypothesis, "true_label": int(r.label)},
            None,
            task="label",
        )
        for r in load_split(data_dir, split).itertuples()
        if str(r.id) not in have
    ]


def in_format(rows, tasks) -> list[dict]:
    """Each example (a cot row, or a gold label-task row) as one row per task, built from the same fields."""
    out = []
    for row in rows:
        if row["task"] != "cot":  # a gold row: already its label task
            out.append(row)
            continue
        thought = json.loads(row["completion"])["thought_process"]
        item = {"id": row["id"], "premise": row["premise"], "hypothesis": row["hypothesis"], "true_label": row["label"]}
        out += [sft_row(row["source"], item, thought, row["teacher_model"], row["reflector_model"], task)
                for task in tasks]  # fmt: skip
    return out


def audit(thought_rows, reflection_rows, min_agreement: float) -> list[dict]:
    """The rows whose gold label the models resist, with the evidence (see the module docstring)."""
    thoughts = {str(t["id"]): t for t in thought_rows}
    suspects = []
    for r in reflection_rows:
        t = thoughts.get(str(r["id"]))
        if t is None or t["correct"]:
            continue
        confident = t.get("n_samples", 1) == 1 or t.get("agreement", 1.0) >= min_agreement
        if confident and (r["attempts"] > 1 or not r["verified"]):
            suspects.append({
                "id": str(r["id"]), "premise": r["premise"], "hypothesis": r["hypothesis"],
                "gold_label": r["true_label"], "teacher_label": t["predicted_label"], "votes": t.get("votes"),
                "agreement": t.get("agreement"), "n_samples": t.get("n_samples", 1),
                "teacher_rationale": t["thought_process"], "teacher_model": t.get("model"),
                "reflection_error_analysis": r["error_analysis"],
                "reflection_rationale": r["improved_thought_process"], "reflected_label": r["reflected_label"],
                "verified": r["verified"], "attempts": r["attempts"], "reflector_model": r.get("model"),
            })  # fmt: skip
    return suspects


def token_lengths(tokenizer, row) -> tuple[int, int]:
    """Prompt tokens (the chat template's, BOS included) and completion tokens (with EOS), as training sees them."""
    prompt = len(tokenizer(student_chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False).input_ids)
    completion = len(tokenizer(" " + row["completion"], add_special_tokens=False).input_ids) + 1
    return prompt, completion


def _describe(values) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def balance(rows, rng) -> list[dict]:
    """Downsample the majority label to the minority's count, keeping input order."""
    by_label = {label: [r for r in rows if r["label"] == label] for label in (0, 1)}
    keep_n = min(len(v) for v in by_label.values())
    if rows and not keep_n:
        missing = next(label for label, group in by_label.items() if not group)
        raise StageError(f"sft.balance_labels: no row has label {missing}, so balancing would drop every row")
    keep = {id(r) for group in by_label.values() for r in rng.sample(group, keep_n)}
    return [r for r in rows if id(r) in keep]


def teacher_accuracy_by_length(thought_rows, tokenizer) -> list[dict]:
    """Teacher accuracy per rationale-length bucket, in tokens of the configured tokenizer (the study's buckets)."""
    lengths = [len(tokenizer(t["thought_process"], add_special_tokens=False).input_ids) for t in thought_rows]
    return accuracy_by_length(lengths, [t["correct"] for t in thought_rows])


def held_out_pairs(data_dir, split: str) -> dict:
    """Pairs of dev/test (train only) -> the reason a train row with that pair is removed."""
    if split != "train":
        return {}
    pairs = {}
    for other in ("dev", "test"):
        for premise, hypothesis in load_split(data_dir, other)[["premise", "hypothesis"]].itertuples(index=False):
            pairs.setdefault(pair_key(premise, hypothesis), f"leak_{other}")
    return pairs


def filter_rows(rows, held_out: dict, tokenizer, cfg) -> tuple[list[dict], dict, Counter, int]:
    """Drop leaked and repeated pairs and over-long rows (see the module docstring).

    -> (rows kept, {id: token lengths}, rows dropped by reason, over-length rows kept).
    """
    seen, kept, lengths, dropped = set(), [], {}, Counter()
    over_length_kept = 0
    for row in rows:
        key = pair_key(row["premise"], row["hypothesis"])
        reason = held_out.get(key) or ("duplicate" if key in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        prompt_tokens, completion_tokens = token_lengths(tokenizer, row)  # only rows still in the running
        if prompt_tokens + completion_tokens > cfg.model.max_seq_length:
            if cfg.sft.drop_too_long:
                dropped["too_long"] += 1
                continue
            over_length_kept += 1
        seen.add(key)
        kept.append(row)
        lengths[row["id"]] = {"id": row["id"], "source": row["source"], "task": row["task"],
                              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}  # fmt: skip
    return kept, lengths, dropped, over_length_kept


def sft_metrics(cfg, thought_rows, reflection_rows, suspects, candidates_n: int, kept, kept_lengths, dropped,
                over_length_kept: int) -> dict:  # fmt: skip
    """metrics/sft_{split}.json: the funnel from candidates to kept rows, the reflections, the audit, the lengths."""
    correct = sum(t["correct"] for t in thought_rows)
    incorrect = len(thought_rows) - correct
    verified = sum(r["verified"] for r in reflection_rows)
    return {
        "candidates": candidates_n,
        "rows": len(kept),
        "rows_by_source": {source: sum(r["source"] == source for r in kept) for source in SOURCES[cfg.sft.label_rows]},
        "format": cfg.sft.format,
        "examples": len({r["id"] for r in kept}),
        "rows_by_task": dict(Counter(r["task"] for r in kept)),
        "label_counts": {str(label): sum(r["label"] == label for r in kept) for label in (0, 1)},
        "dropped": dict(dropped),
        "over_length_kept": over_length_kept,
        "teacher_accuracy": round(correct / len(thought_rows), 4) if thought_rows else 0.0,
        "reflected": len(reflection_rows),
        "verified_reflections": verified,
        "unresolved": len(reflection_rows) - verified,
        "reflection_success_rate": round(verified / incorrect, 4) if incorrect else 0.0,  # as reflections_{split}
        "audit": {
            "suspect": len(suspects),
            "suspect_unresolved": sum(not s["verified"] for s in suspects),
            "suspect_verified_after_retries": sum(s["verified"] for s in suspects),
            "min_agreement": cfg.audit.min_agreement,
            "dropped": dropped["suspect"],
        },
        "prompt_tokens": _describe([e["prompt_tokens"] for e in kept_lengths]),
        "completion_tokens": _describe([e["completion_tokens"] for e in kept_lengths]),
    }


def run(cfg, split: str) -> dict:
    try:
        tasks, _ = check_format(cfg.sft.format)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.sft.label_rows not in SOURCES or (cfg.sft.label_rows == "all" and cfg.sft.format != "label_only"):
        raise ConfigError(f"sft.label_rows={cfg.sft.label_rows!r}: 'verified', or 'all' with sft.format=label_only "
                          "(only the label task can train on a row without a rationale)")  # fmt: skip
    thought_rows = read_jsonl(paths.require(paths.THOUGHTS, split))
    reflection_rows = read_jsonl(paths.require(paths.REFLECTIONS, split))
    paths.require(paths.BASE_DIR)
    rows = candidates(thought_rows, reflection_rows, cfg.sft.include_reflections)
    if cfg.sft.label_rows == "all":
        rows += gold_rows(cfg.data.dir, split, rows)
    candidates_n = len(rows)
    suspects = audit(thought_rows, reflection_rows, cfg.audit.min_agreement)
    write_jsonl(paths.AUDIT_SUSPECT.format(split=split), suspects)
    dropped = Counter()
    if cfg.sft.drop_suspect:
        suspect_ids = {s["id"] for s in suspects}
        rows = [r for r in rows if r["id"] not in suspect_ids]
        dropped["suspect"] = candidates_n - len(rows)
    tokenizer = load_tokenizer()
    kept, lengths, filtered, over_length_kept = filter_rows(rows, held_out_pairs(cfg.data.dir, split), tokenizer, cfg)
    dropped.update(filtered)

    rng = random.Random(cfg.sft.seed)
    if cfg.sft.balance_labels:
        balanced = balance(kept, rng)
        dropped["balance"] += len(kept) - len(balanced)
        kept = balanced
    kept = in_format(kept, tasks)
    if cfg.sft.shuffle:
        rng.shuffle(kept)
    write_jsonl(paths.FINETUNE.format(split=split), kept)

    if cfg.sft.format == "cot":  # the rows as filtered
        kept_lengths = [lengths[r["id"]] for r in kept]
    else:
        kept_lengths = [dict(zip(LENGTH_FIELDS, (r["id"], r["source"], r["task"], *token_lengths(tokenizer, r)),
                                 strict=True)) for r in kept]  # fmt: skip
    write_csv(paths.PLOT_LENGTHS.format(split=split), kept_lengths, LENGTH_FIELDS)
    write_csv(
        paths.PLOT_TEACHER_ACCURACY.format(split=split),
        teacher_accuracy_by_length(thought_rows, tokenizer),
        ACCURACY_FIELDS,
    )
    metrics = sft_metrics(cfg, thought_rows, reflection_rows, suspects, candidates_n, kept, kept_lengths, dropped,
                          over_length_kept)  # fmt: skip
    write_json(paths.SFT_METRICS.format(split=split), metrics)
    return metrics
