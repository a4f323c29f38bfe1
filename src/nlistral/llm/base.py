"""The LLM client seam: the `Client` protocol every backend implements, and the types they share.

A client answers `chat(messages, sample=0) -> Reply` (sample i > 0: the i-th self-consistency sample, sent with
seed + i) or raises RequestFailed; `tally` counts what its transport did (`requests`, `retries_<cause>`, `http_429`,
...); `stop` makes every thread give up at once (Ctrl-C, a 401) and `close` releases what it holds. `is_cached` and
`cached_completion_tokens` let `nlistral estimate` price only what is not stored yet. Its budget (llm/budget.py) and
reply cache are given at construction (`make_client`).
"""

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

# Why a request was sent again; the client counts each as `retries_<cause>`.
RETRY_CAUSES = ("rate_limited", "server_error", "timeout", "connection", "bad_response")


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # served from the reply cache: nothing was sent or paid
    # OpenAI's logprobs (asked with `top_logprobs`): per token, its text and {candidate text: logprob}
    logprobs: list[tuple[str, dict[str, float]]] | None = None


class RequestFailed(Exception):
    """No reply after the allowed retries, or a request the server refused (400/403/404...).

    `reason` is a short stable code (counted in the stage metrics); `detail` says what happened, without secrets.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Tally(Counter[str]):
    """A Counter that worker threads can add to."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self[key] += n


class Client(Protocol):
    tally: Tally  # the transport's counts; `requests` is what was sent

    def chat(self, messages: list[dict], sample: int = 0) -> Reply: ...

    def is_cached(self, messages: list[dict], sample: int = 0) -> bool:
        """Whether the reply is stored already (reply cache, recording): asking sends and costs nothing."""
        ...

    def cached_completion_tokens(self) -> tuple[float, int]:
        """(mean completion tokens, number) of this model's stored replies; (0.0, 0) if none."""
        ...

    def stop(self) -> None: ...

    def close(self) -> None: ...
