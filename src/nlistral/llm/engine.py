"""Drive a chat client over many rows: reprompt invalid replies, record every row as ok or failed."""

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from nlistral.llm import Reply, make_client


@dataclass
class Accept:
    value: dict


@dataclass
class Reprompt:
    reason: str
    feedback: str


@dataclass
class Task:
    id: str
    messages: list[dict]
    check: Callable[[Reply], Accept | Reprompt]
    max_reprompts: int


@dataclass
class Outcome:
    id: str
    value: dict | None = None  # None: the row failed
    reason: str | None = None
    raw: str | None = None  # the last reply's text
    reprompts: list[str] = field(default_factory=list)  # reasons, in order


def _converse(client, task: Task, stats: Counter) -> Outcome:
    messages = list(task.messages)
    outcome = Outcome(task.id)
    while True:
        reply = client.chat(messages)
        stats["requests"] += 1
        stats["prompt_tokens"] += reply.prompt_tokens
        stats["completion_tokens"] += reply.completion_tokens
        outcome.raw = reply.text
        verdict = task.check(reply)
        if isinstance(verdict, Accept):
            outcome.value = verdict.value
            return outcome
        if len(outcome.reprompts) >= task.max_reprompts:
            outcome.reason = verdict.reason
            return outcome
        outcome.reprompts.append(verdict.reason)
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": verdict.feedback}]


def generate(backend_cfg, tasks: list[Task], desc: str, cache_dir: str) -> tuple[list[Outcome], dict]:
    """Run every task; outcomes come back in task order, with the run's accounting."""
    client = make_client(backend_cfg)
    stats = Counter()
    start = time.monotonic()
    outcomes = []
    with tqdm(total=len(tasks), desc=desc, unit="row") as bar:
        for task in tasks:
            outcomes.append(_converse(client, task, stats))
            bar.update()
    cost = (
        stats["prompt_tokens"] * backend_cfg.price_input_per_mtok
        + stats["completion_tokens"] * backend_cfg.price_output_per_mtok
    ) / 1e6
    return outcomes, {**stats, "cost_usd": round(cost, 6), "wall_s": round(time.monotonic() - start, 3)}
