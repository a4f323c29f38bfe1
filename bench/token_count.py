"""How far the 4-characters-a-token count is from Mistral's tokenizer, on the study's real prompts.

../shared/data/mistral_sample/sample_thoughts.jsonl keeps the exact messages sent to `open-mistral-7b` (chat_history);
its replies carry no `usage`, so this compares our two counts (llm/tokens.py) rather than a bill.

    .venv/bin/python bench/token_count.py
"""

import json
import statistics
from pathlib import Path

from nlistral.llm.tokens import prompt_counter

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mistral_sample" / "sample_thoughts.jsonl"


def main() -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    prompts = [[m for m in r["chat_history"] if m["role"] in ("system", "user")][:2] for r in rows]
    approx, tekken = prompt_counter("approx"), prompt_counter("tekken")
    ratios = [approx(p) / tekken(p) for p in prompts]
    total_a, total_t = sum(map(approx, prompts)), sum(map(tekken, prompts))
    print(f"{len(prompts)} real prompts: tekken {total_t} tokens, approx {total_a} ({total_a / total_t - 1:+.1%})")
    print(f"per prompt approx/tekken: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
