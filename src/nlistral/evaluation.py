"""What the three evaluate stages share: the test rows, the student prompt, generation (HF batched or vLLM), the
prediction records and the metrics with their intervals. The stages are stages/evaluate*.py.

Scoring: an output `read_answer` cannot read (no JSON, no label, cut off at max_new_tokens) is a parse failure,
never a label. The confusion counts cover labelled outputs only, so tp + fp + tn + fn + parse_failures = n, and a
failure counts as wrong everywhere: accuracy = (tp + tn) / n; it is a missed positive in recall when the row is an
entailment (and a missed negative in the macro average's class-0 recall otherwise); precision is over the rows the
model gave that label, which a failure is not. `accuracy_parsed` = (tp + tn) / (n - parse_failures).
"""

import json
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nlistral import paths
from nlistral.config import ConfigError
from nlistral.data import load_split
from nlistral.model import base_info
from nlistral.parsing import read_answer
from nlistral.prompts import student_chat_prompt, student_prompt
from nlistral.stats import accuracy_ci

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    output_tokens: int


def eval_rows(cfg):
    """The test split, cut to `eval.limit` rows when set; every evaluate stage scores exactly these rows."""
    rows = load_split(cfg.data.dir, "test")
    return rows if cfg.eval.limit is None else rows.head(cfg.eval.limit)


def student_prompts(rows, tokenizer) -> list[str]:
    """The prompt the student (fine-tuned or base) sees for each row: the one it was trained on, in the tokenizer's
    chat template (special tokens included: tokenize with add_special_tokens=False)."""
    return [student_chat_prompt(tokenizer, student_prompt(r.premise, r.hypothesis)) for r in rows.itertuples()]


@torch.inference_mode()
def generate(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> list[Generation]:
    """Greedy generations in prompt order. Batched with left padding, longest prompts first."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        batch = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for i, ids in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            stopped = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results[i] = Generation(text, "stop" if stopped else "length", len(ids))
    return results


def check_engine(cfg) -> None:
    """`eval.engine` is hf or an importable vLLM; checked before any model is loaded."""
    if cfg.eval.engine not in ENGINES:
        raise ConfigError(f"eval.engine={cfg.eval.engine!r}: choose from {', '.join(ENGINES)}")
    if cfg.eval.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError(
                "eval.engine=vllm needs vLLM, which is not installed: `pip install vllm` on a CUDA machine, "
                "or use eval.engine=hf (batched transformers generation, the default)"
            ) from None


def vllm_generate(cfg, prompts, tokenizer, adapter_dir=None) -> list[Generation]:
    """Greedy generations through vLLM, the adapter (if any) served with its LoRA support at its trained rank."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    info = base_info()
    lora_rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"] if adapter_dir else None
    llm = LLM(
        model=info["name_or_path"],
        revision=info.get("revision"),
        tokenizer=str(paths.BASE_DIR),
        dtype=cfg.model.dtype,
        quantization="bitsandbytes" if cfg.model.load_in_4bit else None,
        enable_lora=adapter_dir is not None,
        max_lora_rank=lora_rank or 16,  # vLLM's default is 16: a higher trained rank must be passed
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=cfg.eval.max_new_tokens)
    lora = LoRARequest("adapter", 1, str(adapter_dir)) if adapter_dir else None
    token_prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
    outputs = llm.generate(token_prompts, params, lora_request=lora)  # token ids: the template's BOS only once
    return [Generation(o.outputs[0].text, o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outputs]


def run_generation(cfg, rows, load_model, tokenizer, adapter_dir=None) -> tuple[list[Generation], float]:
    """Generations for `rows` with the configured engine, and the seconds they took (model loading excluded)."""
    prompts = student_prompts(rows, tokenizer)
    if cfg.eval.engine == "vllm":
        start = time.perf_counter()
        return vllm_generate(cfg, prompts, tokenizer, adapter_dir), time.perf_counter() - start
    model = load_model()
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    return outputs, time.perf_counter() - start


def prediction(row, text: str | None, finish_reason: str | None, output_tokens: int, answer=None) -> dict:
    """One row of predictions*.jsonl (README: Evaluation). `answer` defaults to reading `text`."""
    answer = answer or read_answer(text, finish_reason)
    return {
        "id": str(row.id),
        "premise": row.premise,
        "hypothesis": row.hypothesis,
        "true_label": int(row.label),
        "predicted_label": answer.label,
        "correct": answer.label == row.label,
        "parse_method": answer.method,
        "parse_error": answer.error,
        "finish_reason": finish_reason,
        "output_tokens": output_tokens,
        "output": text,
    }


def _prf(tp: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(true_labels, predicted_labels) -> dict:
    """Metrics for 0/1 true labels vs 0/1/None predictions (None = parse failure, counted wrong; see module doc).

    Precision/recall/F1 from the counts directly (scikit-learn is not a dependency); `precision/recall/f1` are
    the entailment class's, `macro_*` the mean of both classes'.
    """
    pairs = list(zip(true_labels, predicted_labels, strict=True))
    tp = sum(t == 1 and p == 1 for t, p in pairs)
    fp = sum(t == 0 and p == 1 for t, p in pairs)
    tn = sum(t == 0 and p == 0 for t, p in pairs)
    fn = sum(t == 1 and p == 0 for t, p in pairs)
    failures = sum(p is None for _, p in pairs)
    positives = sum(t == 1 for t, _ in pairs)  # includes failures on entailment rows
    n = len(pairs)
    entailment = _prf(tp, tp + fp, positives)
    no_entailment = _prf(tn, tn + fn, n - positives)
    macro = [(a + b) / 2 for a, b in zip(entailment, no_entailment, strict=True)]
    return {
        "n": n,
        "accuracy": round((tp + tn) / n, 4) if n else 0.0,
        "precision": round(entailment[0], 4),
        "recall": round(entailment[1], 4),
        "f1": round(entailment[2], 4),
        "macro_precision": round(macro[0], 4),
        "macro_recall": round(macro[1], 4),
        "macro_f1": round(macro[2], 4),
        "parse_failures": failures,
        "parse_failure_rate": round(failures / n, 4) if n else 0.0,
        "accuracy_parsed": round((tp + tn) / (n - failures), 4) if n - failures else 0.0,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def eval_metrics(cfg, records, model: str, model_id: str, wall: float) -> dict:
    """The metrics*.json object shared by the three evaluate stages (README: Evaluation)."""
    metrics = {"model": model, "model_id": model_id}
    metrics |= score([r["true_label"] for r in records], [r["predicted_label"] for r in records])
    metrics["accuracy_ci95"] = accuracy_ci([r["correct"] for r in records], cfg.eval.bootstrap, cfg.eval.seed)
    metrics["parse_failures_by_reason"] = dict(Counter(r["parse_error"] for r in records if r["parse_error"]))
    output_tokens = sum(r["output_tokens"] for r in records)
    metrics |= {
        "samples_per_s": round(len(records) / wall, 3) if wall else 0.0,
        "output_tokens_per_s": round(output_tokens / wall, 1) if wall else 0.0,
        "wall_time_s": round(wall, 2),
    }
    return metrics
