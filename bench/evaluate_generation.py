"""Generation throughput of the evaluate stages: batched (left padding) vs one row at a time, 4-bit vs not.

Run from the repo root after `dvc repro train` (needs params.yaml, models/base, models/adapter):
    python bench/evaluate_generation.py [--rows 44] [--max-new-tokens 256] [--batch-size 16]
Prints samples/s and output tokens/s per setting (the study generated at 0.23 samples/s on a GPU), and whether the
batched outputs equal the one-by-one outputs (tests/test_evaluate.py asserts that; speed is only printed here).
"""

import argparse
import time

from nlistral.config import load_config
from nlistral.data import load_split
from nlistral.evaluation import generate, student_prompts
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.paths import ADAPTER_DIR


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=44)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config()
    tokenizer = load_tokenizer(ADAPTER_DIR)
    prompts = student_prompts(load_split(cfg.data.dir, "test").head(args.rows), tokenizer)
    for four_bit in (True, False):
        cfg.model.load_in_4bit = four_bit
        model = load_adapter_model(cfg)
        outputs = {}
        for batch_size in (args.batch_size, 1):
            start = time.perf_counter()
            outputs[batch_size] = generate(model, tokenizer, prompts, batch_size, args.max_new_tokens)
            wall = time.perf_counter() - start
            tokens = sum(g.output_tokens for g in outputs[batch_size])
            print(f"4-bit={four_bit} batch={batch_size}: {len(prompts) / wall:.2f} samples/s, "
                  f"{tokens / wall:.0f} output tokens/s ({tokens} tokens in {wall:.2f} s)")  # fmt: skip
        same = sum(a == b for a, b in zip(outputs[args.batch_size], outputs[1], strict=True))
        print(f"4-bit={four_bit}: batched == one-by-one for {same}/{len(prompts)} rows")


if __name__ == "__main__":
    main()
