"""Stage 1: the teacher LLM writes a 3-step rationale and a label for every row of a split."""

from nlistral import paths
from nlistral.data import load_split
from nlistral.llm.engine import Accept, Reprompt, Task, generate
from nlistral.parsing import ReplyError, parse_reply
from nlistral.prompts import teacher_messages
from nlistral.stages.generation import write_outcomes


def check_thought(reply):
    try:
        return Accept(parse_reply(reply.text, finish_reason=reply.finish_reason))
    except ReplyError as err:
        return Reprompt(err.reason, err.feedback)


def run(cfg, split: str) -> dict:
    rows = load_split(cfg.data.dir, split)
    tasks = [
        Task(row.id, teacher_messages(row.premise, row.hypothesis), check_thought, cfg.teacher.max_reprompts)
        for row in rows.itertuples()
    ]
    outcomes, stats = generate(cfg.teacher, tasks, desc=f"thoughts@{split}", cache_dir=cfg.llm_cache_dir)
    records, failed = [], []
    for row, outcome in zip(rows.itertuples(), outcomes, strict=True):
        base = {"id": row.id, "premise": row.premise, "hypothesis": row.hypothesis}
        if outcome.value is None:
            failed.append({**base, "true_label": row.label, "reason": outcome.reason, "error": outcome.error,
                           "raw": outcome.raw})
            continue
        label = outcome.value["predicted_label"]
        records.append({
            **base,
            "thought_process": outcome.value["thought_process"],
            "predicted_label": label,
            "true_label": row.label,
            "correct": label == row.label,
            "reprompts": len(outcome.reprompts),
        })
    correct = sum(r["correct"] for r in records)
    return write_outcomes(
        outcomes, records, failed,
        out_path=paths.THOUGHTS.format(split=split), failed_path=paths.THOUGHTS_FAILED.format(split=split),
        metrics_path=paths.THOUGHTS_METRICS.format(split=split), stats=stats, backend_cfg=cfg.teacher,
        extra={"correct": correct, "incorrect": len(records) - correct,
               "accuracy": round(correct / len(records), 4) if records else 0.0},
    )  # fmt: skip
