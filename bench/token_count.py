"""How far the 4-characters-a-token count is from Mistral's tokenizer, on the study's real prompts.

../shared/data/mistral_sample/sample_thoughts.jsonl keeps the exact messages sent to `open-mistral-7b` (chat_history);
its replies carry no `usage`, so this compares our two counts (llm/tokens.py) rather than a bill.

    .venv/bin/python bench/token_count.py [--sample FILE] [--json bench/results/token-count.json]
"""

import argparse
import json
import statistics
from pathlib import Path

from nlistral.llm.tokens import prompt_counter

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mistral_sample" / "sample_thoughts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the study's sample_thoughts.jsonl")
    parser.add_argument("--json", type=Path, help="also write the figures here (docs cite bench/results/)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.sample.read_text().splitlines() if line.strip()]
    prompts = [[m for m in r["chat_history"] if m["role"] in ("system", "user")][:2] for r in rows]
    approx, tekken = prompt_counter("approx"), prompt_counter("tekken")
    ratios = [approx(p) / tekken(p) for p in prompts]
    total_a, total_t = sum(map(approx, prompts)), sum(map(tekken, prompts))
    print(f"{len(prompts)} real prompts: tekken {total_t} tokens, approx {total_a} ({total_a / total_t - 1:+.1%})")
    print(f"per prompt approx/tekken: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}")  # fmt: skip
    if args.json:
        figures = {"prompts": len(prompts), "tekken_tokens": total_t, "approx_tokens": total_a,
                   "approx_over_tekken": round(total_a / total_t - 1, 4),
                   "per_prompt_ratio": {"median": round(statistics.median(ratios), 4),
                                        "min": round(min(ratios), 4), "max": round(max(ratios), 4)}}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
