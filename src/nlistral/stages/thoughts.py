"""Stage 1: the teacher LLM writes a 3-step rationale and a label for every row of a split.

Self-consistency (`teacher.n_samples` = n > 1): each row is asked n times, sample i with seed + i (each reply cached
on its own), and the majority label of the valid replies is the prediction; the row records its `votes` and its
`agreement` (the share of valid replies that reached the majority label). A tie goes to the label of the
lowest-numbered valid sample, i.e. the reply an n_samples=1 run would have kept. The kept rationale is the
lowest-numbered one that reaches the majority label. A row fails only if none of its samples gave a valid reply.
"""

from collections import Counter

from nlistral import paths
from nlistral.data import load_split
from nlistral.errors import ConfigError
from nlistral.io import write_csv
from nlistral.llm.engine import Accept, Reprompt, Task, generate
from nlistral.parsing import ReplyError, parse_reply
from nlistral.prompts import teacher_messages
from nlistral.stages.generation import prompt_version, provenance, write_outcomes

AGREEMENT_FIELDS = ("agreement", "rows", "accuracy")


def check_thought(reply):
    try:
        return Accept(parse_reply(reply.text, finish_reason=reply.finish_reason))
    except ReplyError as err:
        return Reprompt(err.reason, err.feedback)


def vote(samples) -> tuple[dict, int, float, dict]:
    """Valid sample values (in sample order) -> (votes by label, majority label, agreement, the kept value)."""
    votes = Counter(value["predicted_label"] for value in samples)
    top = max(votes.values())
    label = next(v["predicted_label"] for v in samples if votes[v["predicted_label"]] == top)  # tie: first sample's
    kept = next(v for v in samples if v["predicted_label"] == label)
    return {str(k): votes[k] for k in (0, 1)}, label, round(top / len(samples), 4), kept


def agreement_table(records) -> list[dict]:
    """Plot data: rows and teacher accuracy at each agreement level."""
    levels = sorted({r["agreement"] for r in records})
    table = []
    for level in levels:
        group = [r for r in records if r["agreement"] == level]
        table.append({"agreement": level, "rows": len(group),
                      "accuracy": round(sum(r["correct"] for r in group) / len(group), 4)})  # fmt: skip
    return table


def run(cfg, split: str) -> dict:
    rows = load_split(cfg.data.dir, split)
    teacher = cfg.teacher
    n = teacher.n_samples
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"teacher.n_samples must be a whole number >= 1, not {n!r}")
    tasks = [
        Task(f"{row.id}#{i}", teacher_messages(row.premise, row.hypothesis), check_thought, teacher.max_reprompts, i)
        for row in rows.itertuples()
        for i in range(n)
    ]
    outcomes, stats = generate(teacher, tasks, desc=f"thoughts@{split}", cache_dir=cfg.llm_cache_dir)
    version = prompt_version(teacher_messages("{premise}", "{hypothesis}"))
    records, failed = [], []
    for k, row in enumerate(rows.itertuples()):
        samples = outcomes[k * n : (k + 1) * n]
        base = {"id": row.id, "premise": row.premise, "hypothesis": row.hypothesis}
        source = provenance(teacher, version, sum(o.prompt_tokens for o in samples),
                            sum(o.completion_tokens for o in samples), n)  # fmt: skip
        valid = [o.value for o in samples if o.value is not None]
        if not valid:
            first = samples[0]
            failed.append({**base, "true_label": row.label, "reason": first.reason, "error": first.error,
                           "raw": first.raw, **source})  # fmt: skip
            continue
        votes, label, agreement, kept = vote(valid)
        records.append({
            **base,
            "thought_process": kept["thought_process"],
            "predicted_label": label,
            "true_label": row.label,
            "correct": label == row.label,
            "reprompts": sum(len(o.reprompts) for o in samples),
            "votes": votes,
            "agreement": agreement,
            "samples_failed": n - len(valid),
            **source,
        })  # fmt: skip
    table = agreement_table(records)
    write_csv(paths.PLOT_AGREEMENT.format(split=split), table, AGREEMENT_FIELDS)
    correct = sum(r["correct"] for r in records)
    return write_outcomes(
        outcomes, records, failed,
        out_path=paths.THOUGHTS.format(split=split), failed_path=paths.THOUGHTS_FAILED.format(split=split),
        metrics_path=paths.THOUGHTS_METRICS.format(split=split), stats=stats, backend_cfg=teacher, role="teacher",
        extra={"correct": correct, "incorrect": len(records) - correct,
               "accuracy": round(correct / len(records), 4) if records else 0.0, "n_samples": n,
               "agreement_histogram": {str(t["agreement"]): t["rows"] for t in table},
               "accuracy_by_agreement": {str(t["agreement"]): t["accuracy"] for t in table}},
    )  # fmt: skip
