"""Generation for the student stages (evaluate, evaluate_base): the student prompt, HF batched or vLLM generation.

Scoring (prediction records, metrics) is nlistral.scoring.
"""

import json
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nlistral import paths
from nlistral.config import ConfigError
from nlistral.model import base_info
from nlistral.prompts import student_chat_prompt, student_prompt

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    output_tokens: int


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
