"""What stages 1 and 2 share: turn engine outcomes into the stage's output, failed rows and metrics."""

import hashlib
import json
from collections import Counter

from nlistral.errors import StageError
from nlistral.io import write_jsonl, write_metrics
from nlistral.llm.engine import BATCH_PRICE_FACTOR


def prompt_version(template_messages: list[dict]) -> str:
    """A short hash of a prompt template (its messages with placeholders): changes whenever the prompt does."""
    return hashlib.sha256(json.dumps(template_messages, sort_keys=True).encode()).hexdigest()[:8]


def provenance(backend_cfg, version: str, prompt_tokens: int, completion_tokens: int, n_samples: int = 1) -> dict:
    """What wrote a row, and what its replies cost at the configured prices (the same whether paid now or cached)."""
    factor = BATCH_PRICE_FACTOR if backend_cfg.mode == "batch" else 1.0
    cost = prompt_tokens * backend_cfg.price_input_per_mtok + completion_tokens * backend_cfg.price_output_per_mtok
    return {
        "model": backend_cfg.model,
        "prompt_version": version,
        "temperature": backend_cfg.temperature,
        "seed": backend_cfg.seed,
        "n_samples": n_samples,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": round(cost * factor / 1e6, 8),
    }


def write_outcomes(
    outcomes, records, failed_rows, *, out_path, failed_path, metrics_path, stats, backend_cfg, role, extra=None
) -> dict:
    """Write ok `records` to `out_path`, failed rows (with reason and last raw reply) to `failed_path`, metrics.

    `records` and `failed_rows` come from the same rows, so ok + failed == rows always holds; the stage fails (after
    writing everything) if rows were left unsent by `budget_usd`, or the failed share exceeds `max_failure_rate`.
    """
    write_jsonl(out_path, records)
    write_jsonl(failed_path, failed_rows)
    rows = len(records) + len(failed_rows)
    reprompts = Counter(reason for o in outcomes for reason in o.reprompts)
    metrics = {
        "rows": rows,
        "ok": len(records),
        "failed": len(failed_rows),
        **(extra or {}),
        "failures_by_reason": dict(Counter(r["reason"] for r in failed_rows)),
        "reprompts": sum(reprompts.values()),
        "reprompts_by_reason": dict(reprompts),
        "backend": backend_cfg.backend,
        "model": backend_cfg.model,
        **stats,
    }
    write_metrics(metrics_path, metrics)
    if unsent := metrics["failures_by_reason"].get("budget"):
        raise StageError(
            f"{role}.budget_usd={backend_cfg.budget_usd:g} reached: this run spent ${stats['cost_usd']:.4f} and left "
            f"{unsent} of {rows} rows unsent (reason `budget` in {failed_path}). To continue, re-run with a higher "
            f"{role}.budget_usd: replies already paid are in the cache and are not paid again."
        )
    if rows and len(failed_rows) / rows > backend_cfg.max_failure_rate:
        raise StageError(
            f"{len(failed_rows)} of {rows} rows failed (> max_failure_rate {backend_cfg.max_failure_rate}); "
            f"see {failed_path}"
        )
    return metrics
