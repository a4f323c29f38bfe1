"""Drive a Client (llm/base.py) over many rows: reprompt invalid replies, record every row as ok or failed, account.

`generate` runs each task as a conversation: send its messages, let its `check` accept the reply or ask for a
reprompt (the feedback goes back as a user turn), up to `max_reprompts` times. Transport trouble (429, 5xx,
timeouts) is retried inside the client and never uses up reprompts. In `mode: sync` up to `max_concurrency`
conversations run at once; in `mode: batch` (Mistral) every round of requests goes out as one batch job.
With `budget_usd` set, no request is sent that could take the run's spend past it (llm/budget.py).

Ctrl-C returns at once: the worker threads are daemons, so requests still in flight are abandoned (their replies,
should they arrive before the process ends, are stored only if the cache is still open; nothing is half-written).
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from nlistral.errors import ConfigError
from nlistral.llm import make_client
from nlistral.llm.base import RETRY_CAUSES, Client, Reply, RequestFailed, Tally
from nlistral.llm.budget import Budget
from nlistral.llm.cache import cache_location

BATCH_PRICE_FACTOR = 0.5  # Mistral's Batch API bills half the per-token price


@dataclass
class Accept:
    value: dict


@dataclass
class Reprompt:
    reason: str
    feedback: str


@dataclass
class Reject:
    """Give up on the row now (its check's own budget is spent), whatever reprompts remain."""

    reason: str


@dataclass
class Task:
    id: str
    messages: list[dict]
    check: Callable[[Reply], Accept | Reprompt | Reject]
    max_reprompts: int
    sample: int = 0  # self-consistency: sample i is the same request sent with seed + i


@dataclass
class Outcome:
    id: str
    value: dict | None = None  # None: the row failed
    reason: str | None = None
    raw: str | None = None  # the last reply's text
    reprompts: list[str] = field(default_factory=list)  # reasons, in order
    error: str | None = None  # for a row that got no usable answer: what the server said or did
    prompt_tokens: int = 0  # over all of its replies, paid now or earlier (cached)
    completion_tokens: int = 0


class Conversation:
    """One task's exchange with the model."""

    def __init__(self, task: Task):
        self.task = task
        self.messages = list(task.messages)
        self.outcome = Outcome(task.id)
        self.done = False
        self.failed_rounds = 0  # batch mode: rounds in which its request got no reply

    def ask(self, client: Client) -> Reply:
        if self.task.sample:
            return client.chat(self.messages, sample=self.task.sample)
        return client.chat(self.messages)

    def feed(self, reply: Reply) -> None:
        outcome = self.outcome
        outcome.raw = reply.text
        outcome.prompt_tokens += reply.prompt_tokens
        outcome.completion_tokens += reply.completion_tokens
        verdict = self.task.check(reply)
        if isinstance(verdict, Accept):
            outcome.value, self.done = verdict.value, True
        elif isinstance(verdict, Reject) or len(outcome.reprompts) >= self.task.max_reprompts:
            outcome.reason, self.done = verdict.reason, True
        else:
            outcome.reprompts.append(verdict.reason)
            self.messages += [
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": verdict.feedback},
            ]

    def fail(self, err: RequestFailed) -> None:
        self.outcome.reason, self.outcome.error, self.done = err.reason, err.detail, True


class Accounts:
    """Running totals for the progress bar and the stage metrics."""

    def __init__(self, cfg, bar, price_factor: float):
        self.tally = Tally()
        self.bar = bar
        self.price_in = cfg.price_input_per_mtok / 1e6
        self.price_out = cfg.price_output_per_mtok / 1e6
        self.price_factor = price_factor

    def reply(self, reply: Reply) -> None:
        prefix = "cached_" if reply.cached else ""
        self.tally.add("cache_hits" if reply.cached else "replies")
        self.tally.add(prefix + "prompt_tokens", reply.prompt_tokens)
        self.tally.add(prefix + "completion_tokens", reply.completion_tokens)

    def cost(self, prefix: str = "") -> float:
        t = self.tally
        return t[prefix + "prompt_tokens"] * self.price_in + t[prefix + "completion_tokens"] * self.price_out

    def row_done(self, conv: Conversation) -> None:
        if conv.outcome.value is None:
            self.tally.add("failed_rows")
        self.bar.update()
        self.bar.set_postfix({
            "failed": self.tally["failed_rows"],
            "tokens": self.tally["prompt_tokens"] + self.tally["completion_tokens"],
            "cost": f"${self.cost() * self.price_factor:.4f}",
            "cached": self.tally["cache_hits"],
        }, refresh=False)  # fmt: skip


def generate(backend_cfg, tasks: list[Task], desc: str, cache_dir: str | None) -> tuple[list[Outcome], dict]:
    """Run every task; outcomes come back in task order, with the run's accounting.

    Raises ConfigError (bad key, unknown model, bad mode) before writing anything; rows that fail are outcomes.
    """
    mode = backend_cfg.mode
    if mode not in ("sync", "batch") or (mode == "batch" and backend_cfg.backend != "mistral"):
        message = f"mode {mode!r} is not available for the {backend_cfg.backend} backend: use sync (batch: mistral)"
        raise ConfigError(message)
    price_factor = BATCH_PRICE_FACTOR if mode == "batch" else 1.0
    budget = None
    if backend_cfg.get("budget_usd") is not None:
        budget = Budget(
            backend_cfg.budget_usd, backend_cfg.price_input_per_mtok, backend_cfg.price_output_per_mtok, price_factor
        )
    batch = None
    if mode == "batch":
        from nlistral.llm.batch import BatchTransport  # its HttpClient is the stage's client

        batch = BatchTransport(backend_cfg, cache_location(cache_dir), budget)
        client: Client = batch.client
    else:
        client = make_client(backend_cfg, cache_location(cache_dir), budget)
    conversations = [Conversation(task) for task in tasks]
    start = time.monotonic()
    try:
        with tqdm(total=len(tasks), desc=desc, unit="row") as bar:
            accounts = Accounts(backend_cfg, bar, price_factor)
            if batch is not None:
                batch.run_rounds(conversations, accounts)
            else:
                _run_sync(client, conversations, backend_cfg.max_concurrency, accounts)
    finally:
        client.close()
    stats = _stats(client.tally, accounts, mode)
    if budget is not None:
        stats["budget_usd"] = budget.cap
    return [c.outcome for c in conversations], {**stats, "mode": mode, "wall_s": round(time.monotonic() - start, 3)}


def _run_sync(client: Client, conversations: list[Conversation], max_concurrency: int, accounts: Accounts) -> None:
    """Up to `max_concurrency` daemon worker threads take conversations from a queue; this thread records them."""
    todo: queue.SimpleQueue[Conversation] = queue.SimpleQueue()
    done: queue.SimpleQueue[Conversation | BaseException] = queue.SimpleQueue()
    for conv in conversations:
        todo.put(conv)
    halt = threading.Event()

    def work() -> None:
        while not halt.is_set():
            try:
                conv = todo.get_nowait()
            except queue.Empty:
                return
            try:
                while not conv.done and not halt.is_set():
                    try:
                        reply = conv.ask(client)
                    except RequestFailed as err:
                        conv.fail(err)
                        break
                    accounts.reply(reply)
                    conv.feed(reply)
            except BaseException as err:  # a 401 or a bug: the recording thread re-raises it
                done.put(err)
                return
            done.put(conv)

    for _ in range(min(len(conversations), max(1, max_concurrency))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in conversations:
            finished = _next(done)
            if isinstance(finished, BaseException):
                raise finished
            accounts.row_done(finished)
    except BaseException:  # a 401, Ctrl-C: stop now; requests in flight are abandoned, paid replies are cached
        halt.set()
        client.stop()
        raise


def _next(done: queue.SimpleQueue[Conversation | BaseException]) -> Conversation | BaseException:
    """The next finished conversation; waits in short steps so that Ctrl-C is handled at once on every platform."""
    while True:
        try:
            return done.get(timeout=0.2)
        except queue.Empty:
            continue


def _stats(transport: Tally, accounts: Accounts, mode: str) -> dict:
    """The stage's accounting: what the client's transport sent (`transport`, its tally) and what came back."""
    t = accounts.tally + transport
    retries = {f"retries_{cause}": t[f"retries_{cause}"] for cause in RETRY_CAUSES}
    stats = {
        "requests": t["requests"],
        "cache_hits": t["cache_hits"],
        "retries": sum(retries.values()),
        **retries,
        "http_429": t["http_429"],
        "prompt_tokens": t["prompt_tokens"],
        "completion_tokens": t["completion_tokens"],
        "cached_prompt_tokens": t["cached_prompt_tokens"],
        "cached_completion_tokens": t["cached_completion_tokens"],
        "cost_usd": round(accounts.cost() * accounts.price_factor, 6),  # paid by this run
        "saved_usd": round(accounts.cost("cached_"), 6),  # cached replies re-used, at the sync price
    }
    if mode == "batch":
        stats |= {"batch_jobs": t["batch_jobs"], "batch_rounds": t["batch_rounds"]}
    return stats
