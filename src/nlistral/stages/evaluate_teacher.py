"""Stage: the teacher LLM (`teacher.*`) prompted directly on the test rows -> metrics/eval_teacher.json + predictions.

The teacher gets its stage-1 prompt and answers through the generation engine (reply cache, rate limits, retries,
cost accounting, which lands in the metrics), and its replies go through the same parser and metrics as the
student's. Like the student it answers once: `eval.teacher_max_reprompts` (default 0) allows corrective reprompts.
A row whose request failed (server error after retries) is no label and counts as wrong, under its reason; if more
than `teacher.max_failure_rate` of the rows fail that way the stage stops before writing anything.
"""

from nlistral.errors import StageError
from nlistral.io import write_jsonl, write_metrics
from nlistral.llm.engine import Accept, Reprompt, Task, generate
from nlistral.parsing import Answer, read_answer
from nlistral.paths import EVAL_TEACHER_METRICS, PREDICTIONS_TEACHER
from nlistral.prompts import teacher_messages
from nlistral.scoring import eval_metrics, eval_rows, prediction


def predict(cfg, rows, desc: str = "evaluate-teacher") -> tuple[list[dict], dict]:
    """Prediction records and metrics of the teacher on `rows` (also the extra test sets' teacher stage)."""
    last_reply = {}  # row id -> (answer, reply) of its last reply

    def task(row) -> Task:
        def check(reply):
            answer = read_answer(reply.text, reply.finish_reason)
            last_reply[str(row.id)] = (answer, reply)
            if answer.label is None:
                return Reprompt(answer.error, "Answer again with one JSON object with keys "
                                              '"thought_process" and "predicted_label" (0 or 1).')  # fmt: skip
            return Accept({"label": answer.label})

        return Task(str(row.id), teacher_messages(row.premise, row.hypothesis), check, cfg.eval.teacher_max_reprompts)

    outcomes, stats = generate(cfg.teacher, [task(r) for r in rows.itertuples()], desc=desc,
                               cache_dir=cfg.llm_cache_dir)  # fmt: skip
    unanswered = [o for o in outcomes if o.error is not None]
    if outcomes and len(unanswered) / len(outcomes) > cfg.teacher.max_failure_rate:
        reasons = sorted({o.reason for o in unanswered})
        raise StageError(f"{len(unanswered)} of {len(outcomes)} teacher requests failed ({', '.join(reasons)}); "
                         "nothing written: re-run to retry them (answered rows come from the cache)")  # fmt: skip

    records = []
    for row, outcome in zip(rows.itertuples(), outcomes, strict=True):
        if outcome.error is not None:  # no reply at all: the request's failure is the row's reason
            records.append(prediction(row, None, None, 0, Answer(None, None, outcome.reason)))
            continue
        answer, reply = last_reply[outcome.id]
        records.append(prediction(row, reply.text, reply.finish_reason, reply.completion_tokens, answer))
    metrics = eval_metrics(cfg, records, "teacher", cfg.teacher.model, stats["wall_s"])
    metrics |= {"backend": cfg.teacher.backend, **{k: v for k, v in stats.items() if k != "wall_s"}}
    return records, metrics


def run(cfg) -> dict:
    records, metrics = predict(cfg, eval_rows(cfg))
    write_jsonl(PREDICTIONS_TEACHER, records)
    write_metrics(EVAL_TEACHER_METRICS, metrics)
    print(
        f"evaluate-teacher: {cfg.teacher.model} accuracy {metrics['accuracy']} (95% CI {metrics['accuracy_ci95']}), "
        f"{metrics['parse_failures']}/{metrics['n']} unparsed, ${metrics['cost_usd']} -> {EVAL_TEACHER_METRICS}"
    )
    return metrics
