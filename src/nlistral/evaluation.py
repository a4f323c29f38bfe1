"""Generation for the student stages (evaluate, evaluate_base): the student prompt, through one of two engines.

`eval.engine=hf`: batched greedy transformers generation in this process. `eval.engine=server`: each prompt as a chat
message through the generation engine (nlistral.llm.engine: retries, progress, reply cache) to an OpenAI-compatible
server that applies the same chat template and decodes greedily (vLLM, started by the stage from
`eval.server.command` if set: nlistral.serving). A row the server never answered is a failure with the request's
reason (`connection`, `server_error`, ...); more than `eval.server.max_failure_rate` of them fail the stage after its
files are written. Scoring (prediction records, metrics) is nlistral.scoring.

The fine-tuned model is asked its format's evaluation task (sft.format, prompts.FORMATS); the base model the study's
`cot` prompt. When the label comes first (parsing.LABEL_FIRST_TASKS) generation stops as soon as it is readable:
at the first STOP_AT_LABEL string (transformers' stop strings; the server's `stop`), within eval.label_max_new_tokens.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from nlistral.errors import ConfigError, StageError
from nlistral.io import content_digest
from nlistral.model import base_info
from nlistral.parsing import LABEL_FIRST_TASKS, Answer, read_answer
from nlistral.paths import BASE_DIR
from nlistral.prompts import check_format, student_chat_prompt, student_prompt

ENGINES = ("hf", "server")
STOP_AT_LABEL = (",", "}")  # what follows the label in {"predicted_label": 1, ...} or {"predicted_label": 1}


@dataclass(frozen=True)
class Generation:
    text: str | None
    finish_reason: str | None  # "stop" (EOS) or "length" (max_new_tokens reached); None: no reply
    output_tokens: int
    failure: str | None = None  # eval.engine=server: why the row got no reply (the request's reason)

    def answer(self, task: str = "cot") -> Answer:
        """The parsed output, or no label with the request's failure as the reason."""
        return Answer(None, None, self.failure) if self.failure else read_answer(self.text, self.finish_reason, task)


def eval_task(cfg) -> str:
    """The task the fine-tuned model is asked: its sft.format's evaluation task (prompts.FORMATS)."""
    try:
        return check_format(cfg.sft.format)[1]
    except ValueError as err:
        raise ConfigError(str(err)) from None


def decoding(cfg, task: str) -> tuple[int, tuple[str, ...] | None]:
    """(max new tokens, stop strings) for `task`: stop at the label when it comes first."""
    if task in LABEL_FIRST_TASKS:
        return min(cfg.eval.max_new_tokens, cfg.eval.label_max_new_tokens), STOP_AT_LABEL
    return cfg.eval.max_new_tokens, None


def student_messages(row, task: str = "cot") -> list[dict]:
    """The conversation the student was trained on, up to its answer."""
    return [{"role": "user", "content": student_prompt(row.premise, row.hypothesis, task)}]


def student_prompts(rows, tokenizer, task: str = "cot") -> list[str]:
    """The prompt the student (fine-tuned or base) sees for each row: the one it was trained on, in the tokenizer's
    chat template (special tokens included: tokenize with add_special_tokens=False)."""
    return [student_chat_prompt(tokenizer, student_prompt(r.premise, r.hypothesis, task)) for r in rows.itertuples()]


@torch.inference_mode()
def generate(model, tokenizer, prompts, batch_size: int, max_new_tokens: int, stop=None) -> list[Generation]:
    """Greedy generations in prompt order. Batched with left padding, longest prompts first. `stop`: strings that
    end a row's generation, left out of its text (finish_reason "stop"), as a server's `stop` does."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        batch = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}))  # fmt: skip
        for i, ids in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            stopped = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
            while stop and ids and ids[-1] == tokenizer.pad_token_id:  # stopped early: padded until the batch ends
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if (cut := min((text.find(s) for s in stop or () if s in text), default=-1)) >= 0:
                text, stopped = text[:cut], True
            results[i] = Generation(text, "stop" if stopped else "length", len(ids))
    return results


def check_engine(cfg) -> None:
    """`eval.engine` is one of ENGINES; checked before any model is loaded."""
    if cfg.eval.engine not in ENGINES:
        hint = "; vLLM runs as a server: eval.engine=server (docs/evaluation.md)" if cfg.eval.engine == "vllm" else ""
        raise ConfigError(f"eval.engine={cfg.eval.engine!r}: choose from {', '.join(ENGINES)}{hint}")


def server_backend(cfg, model: str, namespace: str, task: str = "cot"):
    """The generation engine's config for the served student: eval.server's transport keys, greedy, free; the
    task's max_tokens and stop strings (decoding)."""
    max_tokens, stop = decoding(cfg, task)
    server = cfg.eval.server
    keys = ("max_concurrency", "requests_per_second", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s",
            "api_key_env")  # fmt: skip
    return OmegaConf.create({
        "backend": "openai", "mode": "sync", "base_url": server.base_url, "model": model, "cache_namespace": namespace,
        "temperature": 0.0, "seed": None, "response_format": None, "max_tokens": max_tokens, "stop": stop,
        "tokens_per_minute": 0, "price_input_per_mtok": 0.0, "price_output_per_mtok": 0.0, "budget_usd": None,
        **{k: server[k] for k in keys},
    })  # fmt: skip


def server_generation(cfg, rows, adapter_dir=None, task: str = "cot") -> tuple[list[Generation], float]:
    """Generations for `rows` from the served adapter (`adapter_dir` given) or base, and the seconds they took."""
    from nlistral.llm.engine import Accept, Task  # here: the hf engine needs no HTTP client
    from nlistral.llm.engine import generate as engine_generate
    from nlistral.serving import running_server

    server, info = cfg.eval.server, base_info()
    # {revision}: the pinned commit of a hub base ("main" for a folder, where servers ignore it)
    fields = {"base": info["name_or_path"], "revision": info.get("revision") or "main", "tokenizer": str(BASE_DIR)}
    if adapter_dir is not None:
        model, template = server.model, server.command
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))["r"]
        fields |= {"name": model, "adapter": str(adapter_dir), "rank": rank}
        served = content_digest(adapter_dir, BASE_DIR)
    else:
        model, template = server.base_model_name or info["name_or_path"], server.base_command or server.command
        served = content_digest(BASE_DIR)
    # The cache answers the same model (content) asked the same way by the same command or server, on any port.
    namespace = f"student {served} via {template or server.base_url}"
    replies = {}

    def row_task(row) -> Task:
        def keep(reply):
            replies[str(row.id)] = reply
            return Accept({})

        return Task(str(row.id), student_messages(row, task), keep, 0)

    backend = server_backend(cfg, model, namespace, task)
    with running_server(server, template, fields, model) as base_url:
        backend.base_url = base_url
        outcomes, stats = engine_generate(backend, [row_task(r) for r in rows.itertuples()], desc=f"generate ({model})",
                                                 cache_dir=cfg.get("llm_cache_dir"))  # fmt: skip
    outputs = []
    for outcome in outcomes:
        if outcome.error is not None:
            outputs.append(Generation(None, None, 0, outcome.reason))
        else:
            reply = replies[outcome.id]
            outputs.append(Generation(reply.text, reply.finish_reason, reply.completion_tokens))
    failed = sum(g.failure is not None for g in outputs)
    print(f"server: {len(outputs)} rows from {model!r}: {stats['requests']} requests, {stats['cache_hits']} from the "
          f"cache, {failed} without a reply")  # fmt: skip
    return outputs, stats["wall_s"]


def check_failures(cfg, outputs: list[Generation]) -> None:
    """After the stage wrote its files: StageError (exit 1) if more than eval.server.max_failure_rate of the rows got
    no reply from the server; a re-run retries them, the answered rows come from the reply cache."""
    failures = [g.failure for g in outputs if g.failure is not None]
    if outputs and len(failures) / len(outputs) > cfg.eval.server.max_failure_rate:
        raise StageError(f"{len(failures)} of {len(outputs)} rows got no reply from the server "
                         f"({', '.join(sorted(set(failures)))}): recorded as failed; re-run to retry them "
                         "(answered rows come from the reply cache)")  # fmt: skip


def run_generation(cfg, rows, load_model, tokenizer, adapter_dir=None, task: str = "cot") -> tuple[list[Generation],
                                                                                                    float]:  # fmt: skip
    """Generations for `rows` with the configured engine, and the seconds they took (model loading or server start
    excluded). `load_model` is called only by the hf engine; the server serves `adapter_dir` (None: the base).
    `task`: what the model is asked (eval_task for the fine-tuned model)."""
    if cfg.eval.engine == "server":
        return server_generation(cfg, rows, adapter_dir, task)
    prompts = student_prompts(rows, tokenizer, task)
    model = load_model()
    max_new_tokens, stop = decoding(cfg, task)
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, cfg.eval.batch_size, max_new_tokens, stop)
    return outputs, time.perf_counter() - start
