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
Before the fine-tuned model generates, its budget is checked against what it was trained to write (check_token_budget).

Every generation carries the probability of entailment at the step that wrote its label (nlistral.confidence): the
hf engine keeps the top candidates of each step's scores, a server returns them as `logprobs`/`top_logprobs`.
`eval.scoring=likelihood` (a task whose answer starts with the label): the hf engine runs one forward pass over
prompt + the answer's tokens before the label and takes the likelier label token; a server (which cannot pre-fill
the assistant's answer) decodes greedily up to the label, as generation does, and the label is the likelier of the
two label tokens at that step.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from nlistral import paths
from nlistral.confidence import LOGPROBS, Steps, label_probability
from nlistral.errors import ConfigError, StageError
from nlistral.io import content_digest
from nlistral.model import base_info, require_cuda
from nlistral.parsing import LABEL_FIRST_TASKS, Answer, read_answer
from nlistral.paths import BASE_DIR
from nlistral.prompts import check_format, completion_json, student_chat_prompt, student_prompt

ENGINES = ("hf", "server")
STOP_AT_LABEL = (",", "}")  # what follows the label in {"predicted_label": 1, ...} or {"predicted_label": 1}
# The LoRA ranks `vllm serve --max-lora-rank` accepts (vllm/config/lora.py: MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Generation:
    text: str | None
    finish_reason: str | None  # "stop" (EOS) or "length" (max_new_tokens reached); None: no reply
    output_tokens: int
    failure: str | None = None  # eval.engine=server: why the row got no reply (the request's reason)
    p_entailment: float | None = None  # at the label's step (nlistral.confidence); None: no label step read

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


def check_scoring(cfg, task: str) -> str:
    """eval.scoring (generate | likelihood); likelihood only for a task whose answer starts with the label."""
    scoring = cfg.eval.get("scoring", "generate")
    if scoring == "likelihood" and task not in LABEL_FIRST_TASKS:
        raise ConfigError(
            "eval.scoring=likelihood needs an answer that starts with the label (sft.format label_first, label_only "
            f"or multitask); sft.format={cfg.sft.format} asks {task!r}"
        )
    return scoring


class TopLogprobs:
    """A logits processor that keeps, for each step, the LOGPROBS likeliest tokens and every token holding one digit
    0 or 1 (so a label's other digit is never missing, however unlikely): (ids, logprobs), batch x candidates."""

    def __init__(self, digits: torch.Tensor):
        self.digits = digits  # digit_tokens(tokenizer)
        self.steps = []

    def __call__(self, input_ids, scores):
        logprobs = scores.float().log_softmax(-1)
        values, ids = logprobs.topk(LOGPROBS)
        digits = self.digits.to(ids.device).expand(len(ids), -1)
        ids, values = torch.cat([ids, digits], -1), torch.cat([values, logprobs.gather(-1, digits)], -1)
        self.steps.append((ids, values))  # kept on the device: no GPU-to-CPU copy at every step
        return scores

    def lists(self) -> list:
        """The steps as Python lists ((ids, logprobs) per step, each batch x candidates), copied off the device once."""
        if not self.steps:
            return []
        ids, values = (torch.stack(part).tolist() for part in zip(*self.steps, strict=True))
        return list(zip(ids, values, strict=True))


def digit_tokens(tokenizer) -> torch.Tensor:
    """The ids of the tokens holding exactly one digit 0 or 1."""
    digits = [i for i in range(len(tokenizer)) if sum(map(tokenizer.decode([i]).count, "01")) == 1]
    return torch.tensor(digits, dtype=torch.long)


def steps_of(tokenizer, ids: list[int], top: list, row: int) -> Steps:
    """Row `row`'s generated `ids` with the candidates `top` (TopLogprobs.lists()) as confidence.Steps."""
    text = {}

    def decode(token):
        if token not in text:
            text[token] = tokenizer.decode([token])
        return text[token]

    return [(decode(token), {decode(c): lp for c, lp in zip(*(part[row] for part in top[j]), strict=True)})
            for j, token in enumerate(ids)]  # fmt: skip


@torch.inference_mode()
def generate(model, tokenizer, prompts, batch_size: int, max_new_tokens: int, stop=None, task: str = "cot"
             ) -> list[Generation]:  # fmt: skip
    """Greedy generations in prompt order, with the probability of entailment at the label's step. Batched with left
    padding, longest prompts first. `stop`: strings that end a row's generation, left out of its text (finish_reason
    "stop"), as a server's `stop` does."""
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"
    digits = digit_tokens(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        batch = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        top = TopLogprobs(digits)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=LogitsProcessorList([top]),
                             **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}))  # fmt: skip
        steps = top.lists()
        for row, (i, ids) in enumerate(zip(batch, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True)):
            stopped = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
            while stop and ids and ids[-1] == tokenizer.pad_token_id:  # stopped early: padded until the batch ends
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if (cut := min((text.find(s) for s in stop or () if s in text), default=-1)) >= 0:
                text, stopped = text[:cut], True
            p = label_probability(steps_of(tokenizer, ids, steps, row), task in LABEL_FIRST_TASKS)
            results[i] = Generation(text, "stop" if stopped else "length", len(ids), p_entailment=p)
    return results


def label_tokens(tokenizer, user_prompt: str, task: str) -> tuple[list[int], list[int], list[int]]:
    """(the generation prompt's tokens, the answer's tokens before the label, [label 0's token, label 1's token]) for
    `user_prompt`, as training tokenized it: the chat template over the prompt and its completion."""
    prompt = student_chat_prompt(tokenizer, user_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    tails = []
    for label in (0, 1):
        turns = [
            {"role": "user", "content": user_prompt},
            {"role": "assistant", "content": completion_json("", label, task)},
        ]
        ids = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False).input_ids
        if ids[: len(prompt_ids)] != prompt_ids:
            raise StageError("eval.scoring=likelihood: the prompt's tokens change when the answer follows them")
        tails.append(ids[len(prompt_ids) :])
    common = next(k for k, (a, b) in enumerate(zip(*tails, strict=False)) if a != b)
    return prompt_ids, tails[0][:common], [tails[0][common], tails[1][common]]


@torch.inference_mode()
def score_labels(model, tokenizer, user_prompts, batch_size: int, task: str) -> list[Generation]:
    """eval.scoring=likelihood on the hf engine: one forward pass per row over prompt + the answer's tokens before the
    label (right-padded), the likelier of the two label tokens as the answer; no token is generated."""
    inputs, labels = [], []
    for user_prompt in user_prompts:
        prompt_ids, prefix, pair = label_tokens(tokenizer, user_prompt, task)
        inputs.append(prompt_ids + prefix)
        labels.append((prefix, pair))
    results = []
    for start in tqdm(range(0, len(inputs), batch_size), desc="score labels", unit="batch"):
        batch = inputs[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch], device=model.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch], device=model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for k, row in enumerate(batch):
            prefix, pair = labels[start + k]
            p0, p1 = logits[k, len(row) - 1].float().softmax(-1)[pair].tolist()
            text = tokenizer.decode(prefix + [pair[int(p1 > p0)]], skip_special_tokens=True)
            results.append(Generation(text, "stop", 0, p_entailment=round(p1 / (p0 + p1), 6)))
    return results


def check_engine(cfg) -> None:
    """`eval.engine` is one of ENGINES, and the hf engine has the GPU a `model.requires_cuda` model needs; checked
    before any model is loaded."""
    if cfg.eval.engine not in ENGINES:
        hint = "; vLLM runs as a server: eval.engine=server (docs/evaluation.md)" if cfg.eval.engine == "vllm" else ""
        raise ConfigError(f"eval.engine={cfg.eval.engine!r}: choose from {', '.join(ENGINES)}{hint}")
    if cfg.eval.engine == "hf":
        require_cuda(cfg)


def check_token_budget(cfg, tokenizer, task: str) -> None:
    """The fine-tuned model gets the tokens its answers need: eval.max_new_tokens at least the longest completion it
    was trained on (metrics/sft_train.json, EOS included), or for a label-first task eval.label_max_new_tokens at
    least its label prefix (`{"predicted_label": 1,`). A shorter budget cuts answers into `truncated` parse
    failures, in both engines. ConfigError (exit 2) before anything is generated, unless
    eval.allow_short_max_new_tokens (smoke runs that cut answers short on purpose)."""
    if cfg.eval.get("allow_short_max_new_tokens"):
        return
    if task in LABEL_FIRST_TASKS:
        prefix = completion_json("x", 1, task)
        prefix = prefix[: min(prefix.index(s) for s in STOP_AT_LABEL if s in prefix) + 1]
        needed = len(tokenizer(" " + prefix, add_special_tokens=False).input_ids)
        key, budget, what = "eval.label_max_new_tokens", cfg.eval.label_max_new_tokens, f"the label prefix {prefix!r}"
    else:
        stats = paths.require(paths.SFT_METRICS, "train")
        needed = json.loads(stats.read_text(encoding="utf-8"))["completion_tokens"]["max"]
        key, budget, what = "eval.max_new_tokens", cfg.eval.max_new_tokens, f"the longest trained completion ({stats})"
    if budget < needed:
        raise ConfigError(f"{key}={budget} is shorter than {what}: {needed} tokens; set {key}={needed} or more")


def vllm_lora_rank(rank: int) -> int:
    """The adapter's LoRA r rounded up to a rank `vllm serve --max-lora-rank` accepts: 4 -> 8, 24 -> 32."""
    if rank > VLLM_LORA_RANKS[-1]:
        raise ConfigError(f"train.lora_r={rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


def server_backend(cfg, model: str, namespace: str, task: str = "cot"):
    """The generation engine's config for the served student: eval.server's transport keys, greedy, free; the
    task's max_tokens and stop strings (decoding)."""
    max_tokens, stop = decoding(cfg, task)
    server = cfg.eval.server
    keys = ("max_concurrency", "requests_per_second", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s",
            "max_wait_s", "api_key_env")  # fmt: skip
    return OmegaConf.create({
        "backend": "openai", "mode": "sync", "base_url": server.base_url, "model": model, "cache_namespace": namespace,
        "temperature": 0.0, "seed": None, "response_format": None, "max_tokens": max_tokens, "stop": stop,
        "top_logprobs": LOGPROBS,
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
        fields |= {"name": model, "adapter": str(adapter_dir), "rank": vllm_lora_rank(rank)}
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
            p = label_probability(reply.logprobs, task in LABEL_FIRST_TASKS)
            outputs.append(Generation(reply.text, reply.finish_reason, reply.completion_tokens, p_entailment=p))
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


def run_generation(cfg, rows, load_model, tokenizer, adapter_dir=None, task: str = "cot", scoring: str = "generate"
                   ) -> tuple[list[Generation], float]:  # fmt: skip
    """Generations for `rows` with the configured engine, and the seconds they took (model loading or server start
    excluded). `load_model` is called only by the hf engine; the server serves `adapter_dir` (None: the base).
    `task`: what the model is asked (eval_task for the fine-tuned model); `scoring`: check_scoring's (a server's
    greedy request stops at the label either way, so its answer is the likelier label token)."""
    if adapter_dir is not None and scoring == "generate":  # label scoring generates nothing: no budget to check
        check_token_budget(cfg, tokenizer, task)
    if cfg.eval.engine == "server":
        return server_generation(cfg, rows, adapter_dir, task)
    model = load_model()
    start = time.perf_counter()
    if scoring == "likelihood":
        user_prompts = [student_prompt(r.premise, r.hypothesis, task) for r in rows.itertuples()]
        outputs = score_labels(model, tokenizer, user_prompts, cfg.eval.batch_size, task)
    else:
        max_new_tokens, stop = decoding(cfg, task)
        outputs = generate(model, tokenizer, student_prompts(rows, tokenizer, task), cfg.eval.batch_size,
                           max_new_tokens, stop, task)  # fmt: skip
    return outputs, time.perf_counter() - start
