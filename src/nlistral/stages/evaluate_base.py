"""Stage: the base model with no adapter, zero-shot, on the same test rows as `evaluate`, asked the `cot` prompt.

The floor the fine-tuning has to beat -> metrics/eval_base.json + metrics/predictions_base.jsonl, same format.
The embedded profile's base model is untrained, so expect (nearly) every output to be a parse failure.
"""

from nlistral.evaluation import check_engine, check_failures, run_generation
from nlistral.io import write_jsonl, write_metrics
from nlistral.model import base_info, load_base_model, load_tokenizer
from nlistral.paths import BASE_DIR, EVAL_BASE_METRICS, PREDICTIONS_BASE
from nlistral.scoring import eval_metrics, eval_rows, prediction


def run(cfg) -> dict:
    check_engine(cfg)
    rows = eval_rows(cfg)
    tokenizer = load_tokenizer(BASE_DIR)
    outputs, wall = run_generation(cfg, rows, lambda: load_base_model(cfg).eval(), tokenizer)
    records = [prediction(row, g.text, g.finish_reason, g.output_tokens, g.answer(), g.p_entailment)
               for row, g in zip(rows.itertuples(), outputs, strict=True)]  # fmt: skip
    metrics = eval_metrics(cfg, records, "base", base_info()["name_or_path"], wall)
    write_jsonl(PREDICTIONS_BASE, records)
    write_metrics(EVAL_BASE_METRICS, metrics)
    check_failures(cfg, outputs)
    print(f"evaluate-base: accuracy {metrics['accuracy']} (95% CI {metrics['accuracy_ci95']}), "
          f"{metrics['parse_failures']}/{metrics['n']} unparsed -> {EVAL_BASE_METRICS}")  # fmt: skip
    return metrics
