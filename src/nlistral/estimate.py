"""`nlistral estimate [--split S] [--json] [overrides]`: what stages 1-2 will send and cost. It sends nothing.

Per stage and split: rows, requests (first asks + the expected reprompts), prompt tokens (counted from the real
prompts, llm/tokens.py; a reprompt re-sends the conversation plus a reply and the feedback), completion tokens (the
mean of this model's replies already in the reply cache, else `expected_completion_tokens`), cost at the sync and
the batch price, rows whose replies are all cached already (they cost nothing and are left out of the counts; with
the replay backend every row: it sends nothing), and the wall time under the configured rate limits. Reflections
before stage 1 has run: `estimate.teacher_error_rate` of the rows, with the teacher's rationale taken as
`teacher.expected_completion_tokens` long.
"""

import json

from nlistral import paths
from nlistral.data import load_split
from nlistral.io import read_jsonl
from nlistral.llm import make_client
from nlistral.llm.cache import cache_location
from nlistral.llm.engine import BATCH_PRICE_FACTOR
from nlistral.llm.tokens import prompt_counter
from nlistral.prompts import reflector_messages, teacher_messages

FEEDBACK_TOKENS = 60  # a reprompt's corrective message, about
FIELDS = ("rows", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "cost_usd_batch", "cached_rows",
          "wall_s")  # fmt: skip


def _asks(cfg, stage: str, split: str) -> tuple[list[list[list[dict]]], str, int]:
    """-> (per row, the messages of each sample), how the rows were chosen, rows not yet known (reflections)."""
    if stage == "thoughts":
        rows = load_split(cfg.data.dir, split)
        messages = [teacher_messages(r.premise, r.hypothesis) for r in rows.itertuples()]
        return [[m] * cfg.teacher.n_samples for m in messages], "every row", 0
    path = paths.THOUGHTS.format(split=split)
    try:
        wrong = [t for t in read_jsonl(path) if not t["correct"]]
    except FileNotFoundError:
        rows = load_split(cfg.data.dir, split)
        rate = cfg.estimate.teacher_error_rate
        sample = [[reflector_messages(r.premise, r.hypothesis, "", 0, 1)] for r in rows.itertuples()]
        return sample, f"estimate.teacher_error_rate={rate:g} of the rows (stage 1 has not run)", rate
    asks = [[reflector_messages(t["premise"], t["hypothesis"], t["thought_process"], t["predicted_label"],
                                t["true_label"])] for t in wrong]  # fmt: skip
    return asks, f"the teacher's wrong rows in {path}", 0


def estimate_stage(cfg, stage: str, split: str) -> dict:
    role = "teacher" if stage == "thoughts" else "reflector"
    backend = cfg[role]
    asks, basis, error_rate = _asks(cfg, stage, split)
    count = prompt_counter(backend.tokenizer)
    completion, measured = float(backend.expected_completion_tokens), 0
    client = make_client(backend, cache_location(cfg.llm_cache_dir))
    try:  # what is stored already (reply cache, recording) is paid for
        mean, measured = client.cached_completion_tokens()
        completion = mean if measured else completion
        uncached = [samples for samples in asks if not all(client.is_cached(m, i) for i, m in enumerate(samples))]
    finally:
        client.close()
    first = [count(m) for samples in uncached for m in samples]
    scale = 1.0
    if error_rate:  # reflections before stage 1: every row's prompt, weighted by the expected error rate
        first = [p + cfg.teacher.expected_completion_tokens for p in first]
        scale = error_rate
    reprompt = backend.expected_reprompt_rate
    requests = len(first) * (1 + reprompt) * scale
    prompt_tokens = (sum(first) + reprompt * sum(p + completion + FEEDBACK_TOKENS for p in first)) * scale
    completion_tokens = requests * completion
    cost = (prompt_tokens * backend.price_input_per_mtok + completion_tokens * backend.price_output_per_mtok) / 1e6
    waits = [requests * backend.expected_latency_s / max(1, backend.max_concurrency)]
    if backend.requests_per_second:
        waits.append(requests / backend.requests_per_second)
    if backend.tokens_per_minute:
        waits.append((prompt_tokens + completion_tokens) / backend.tokens_per_minute * 60)
    return {
        "rows": round(len(asks) * scale),
        "requests": round(requests),
        "prompt_tokens": round(prompt_tokens),
        "completion_tokens": round(completion_tokens),
        "cost_usd": round(cost, 4),
        "cost_usd_batch": round(cost * BATCH_PRICE_FACTOR, 4),
        "cached_rows": len(asks) - len(uncached) if not error_rate else 0,
        "wall_s": round(max(waits)),
        "model": f"{backend.backend}:{backend.model}",
        "rows_from": basis,
        "completion_tokens_from": f"mean of {measured} cached replies" if measured else
        f"{role}.expected_completion_tokens",
        "tokenizer": backend.tokenizer,
    }  # fmt: skip


def estimate(cfg, splits) -> dict:
    result = {f"{stage}@{split}": estimate_stage(cfg, stage, split) for stage in ("thoughts", "reflections")
              for split in splits}  # fmt: skip
    total = {key: sum(part[key] for part in result.values()) for key in FIELDS}
    total["cost_usd"], total["cost_usd_batch"] = round(total["cost_usd"], 4), round(total["cost_usd_batch"], 4)
    return {**result, "total": total}


def run(cfg, splits, as_json: bool = False) -> dict:
    result = estimate(cfg, splits)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{'':18}" + "".join(f"{key:>18}" for key in FIELDS))
    for name, part in result.items():
        print(f"{name:18}" + "".join(f"{part[key]:>18,}" for key in FIELDS))
    for name, part in result.items():
        if name != "total":
            print(f"{name}: {part['model']}; rows: {part['rows_from']}; completions: {part['completion_tokens_from']};"
                  f" prompt tokens: {part['tokenizer']}")  # fmt: skip
    print("Costs are for what is not cached yet; nothing was sent. Batch mode bills half.")
    return result
