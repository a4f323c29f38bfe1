"""Generation throughput of the evaluate stage: batched (left padding) vs one prompt at a time, 4-bit vs not.

Run from the repo root after `dvc repro train` (needs params.yaml, models/base, models/adapter):
    python bench/evaluate_generation.py [--rows 44] [--max-new-tokens 256]
Prints rows/s per setting and whether the batched outputs equal the one-by-one outputs.
"""

import argparse
import time

from nlistral.config import load_config
from nlistral.data import load_split
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.paths import ADAPTER_DIR
from nlistral.prompts import inst_prompt, student_prompt
from nlistral.stages.evaluate import generate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=44)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config()
    rows = load_split(cfg.data.dir, "test").head(args.rows)
    prompts = [inst_prompt(student_prompt(r.premise, r.hypothesis)) for r in rows.itertuples()]
    tokenizer = load_tokenizer(ADAPTER_DIR)
    for four_bit in (True, False):
        cfg.model.load_in_4bit = four_bit
        model = load_adapter_model(cfg)
        outputs = {}
        for batch_size in (args.batch_size, 1):
            start = time.perf_counter()
            outputs[batch_size] = generate(model, tokenizer, prompts, batch_size, args.max_new_tokens)
            wall = time.perf_counter() - start
            print(f"4-bit={four_bit} batch={batch_size}: {len(prompts) / wall:.1f} rows/s ({wall:.2f} s)")
        same = sum(a == b for a, b in zip(outputs[args.batch_size], outputs[1], strict=True))
        print(f"4-bit={four_bit}: batched == one-by-one for {same}/{len(prompts)} rows")


if __name__ == "__main__":
    main()
