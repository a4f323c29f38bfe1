"""Stage 2: a stronger LLM corrects every wrong teacher rationale, given the true label.

A reflection counts only if its own label reaches the true label: one that disagrees is asked again (up to
`reflector.max_attempts` in all) and, if it still disagrees, is kept as unresolved (`verified: false`). Its label
is never overwritten, and unresolved reflections never reach the fine-tuning set.
"""

from nlistral import paths
from nlistral.io import iter_jsonl
from nlistral.llm.engine import Accept, Reject, Reprompt, Task, generate
from nlistral.parsing import REFLECTION_FIELDS, ReplyError, parse_reply
from nlistral.prompts import label_mismatch_feedback, reflector_messages
from nlistral.stages.generation import prompt_version, provenance, write_outcomes


def reflection_check(true_label: int, max_attempts: int, max_reprompts: int):
    """A reply check with two budgets: `max_reprompts` for invalid replies, `max_attempts` reflections in all.

    A valid reflection that still disagrees after `max_attempts` is accepted as unresolved, never failed.
    """
    attempts = invalid = 0

    def check(reply):
        nonlocal attempts, invalid
        try:
            parsed = parse_reply(reply.text, REFLECTION_FIELDS, reply.finish_reason)
        except ReplyError as err:
            invalid += 1
            return Reject(err.reason) if invalid > max_reprompts else Reprompt(err.reason, err.feedback)
        attempts += 1
        verified = parsed["predicted_label"] == true_label
        if not verified and attempts < max_attempts:
            return Reprompt("label_mismatch", label_mismatch_feedback(parsed["predicted_label"], true_label))
        return Accept({**parsed, "verified": verified, "attempts": attempts})

    return check


def run(cfg, split: str) -> dict:
    wrong = [t for t in iter_jsonl(paths.require(paths.THOUGHTS, split)) if not t["correct"]]  # only these are held
    ref = cfg.reflector
    tasks = [
        Task(
            t["id"],
            reflector_messages(
                t["premise"], t["hypothesis"], t["thought_process"], t["predicted_label"], t["true_label"]
            ),
            reflection_check(t["true_label"], ref.max_attempts, ref.max_reprompts),
            max_reprompts=ref.max_reprompts + ref.max_attempts - 1,  # the check enforces each budget
        )
        for t in wrong
    ]
    outcomes, stats = generate(ref, tasks, desc=f"reflections@{split}", cache_dir=cfg.llm_cache_dir)
    version = prompt_version(reflector_messages("{premise}", "{hypothesis}", "{thought_process}", 0, 1))
    records, failed = [], []
    for thought, outcome in zip(wrong, outcomes, strict=True):
        base = {key: thought[key] for key in ("id", "premise", "hypothesis", "thought_process", "predicted_label",
                                              "true_label")}  # fmt: skip
        source = provenance(ref, version, outcome.prompt_tokens, outcome.completion_tokens)
        if outcome.value is None:
            failed.append({**base, "reason": outcome.reason, "error": outcome.error, "raw": outcome.raw, **source})
            continue
        value = outcome.value
        records.append(
            {
                **base,
                "error_analysis": value["error_analysis"],
                "improved_thought_process": value["improved_thought_process"],
                "reflected_label": value["predicted_label"],
                "verified": value["verified"],
                "attempts": value["attempts"],
                "teacher_model": thought.get("model"),
                **source,
            }
        )
    verified = sum(r["verified"] for r in records)
    return write_outcomes(
        outcomes, records, failed,
        out_path=paths.REFLECTIONS.format(split=split), failed_path=paths.REFLECTIONS_FAILED.format(split=split),
        metrics_path=paths.REFLECTIONS_METRICS.format(split=split), stats=stats, backend_cfg=ref, role="reflector",
        extra={"verified": verified, "unresolved": len(records) - verified,
               "success_rate": round(verified / len(wrong), 4) if wrong else 0.0},
    )  # fmt: skip
