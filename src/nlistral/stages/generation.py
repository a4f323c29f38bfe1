"""What stages 1 and 2 share: turn engine outcomes into the stage's output, failed rows and metrics."""

from collections import Counter

from nlistral.io import write_json, write_jsonl
from nlistral.stages import StageError


def write_outcomes(
    outcomes, records, failed_rows, *, out_path, failed_path, metrics_path, stats, backend_cfg, extra=None
) -> dict:
    """Write ok `records` to `out_path`, failed rows (with reason and last raw reply) to `failed_path`, metrics.

    `records` and `failed_rows` come from the same outcomes, so ok + failed == rows always holds; the stage
    fails (after writing everything) if the failed share exceeds `backend_cfg.max_failure_rate`.
    """
    write_jsonl(out_path, records)
    write_jsonl(failed_path, failed_rows)
    rows = len(outcomes)
    reprompts = Counter(reason for o in outcomes for reason in o.reprompts)
    metrics = {
        "rows": rows,
        "ok": len(records),
        "failed": len(failed_rows),
        **(extra or {}),
        "failures_by_reason": dict(Counter(o.reason for o in outcomes if o.value is None)),
        "reprompts": sum(reprompts.values()),
        "reprompts_by_reason": dict(reprompts),
        "backend": backend_cfg.backend,
        "model": backend_cfg.model,
        **stats,
    }
    write_json(metrics_path, metrics)
    if rows and len(failed_rows) / rows > backend_cfg.max_failure_rate:
        raise StageError(
            f"{len(failed_rows)} of {rows} rows failed (> max_failure_rate {backend_cfg.max_failure_rate}); "
            f"see {failed_path}"
        )
    return metrics
