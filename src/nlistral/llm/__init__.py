"""The one LLM client seam: every backend answers `chat(messages, sample=0) -> Reply` (sample i > 0: the i-th
self-consistency sample, sent with seed + i); `engine.generate` drives them.

Backends (`backend:` in conf/teacher, conf/reflector): `offline` (llm/offline.py, a free stand-in), `mistral` and
`openai` (llm/http.py: Mistral's API or any OpenAI-compatible server, with retries, rate limits and a reply cache),
`replay` (llm/replay.py: answers recorded in an outputs file, e.g. the study's).
"""

import threading
from collections import Counter
from dataclasses import dataclass

from nlistral.config import ConfigError

BACKENDS = ("offline", "mistral", "openai", "replay")


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # served from the reply cache: nothing was sent or paid


class RequestFailed(Exception):
    """No reply after the allowed retries, or a request the server refused (400/403/404...).

    `reason` is a short stable code (counted in the stage metrics); `detail` says what happened, without secrets.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Tally(Counter):
    """A Counter that worker threads can add to."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self[key] += n


def make_client(backend_cfg, cache_dir):
    """The client for a `teacher`/`reflector` config subtree; HTTP clients cache replies under `cache_dir`."""
    if backend_cfg.backend == "offline":
        from nlistral.llm.offline import OfflineClient

        return OfflineClient()
    if backend_cfg.backend in ("mistral", "openai"):
        from nlistral.llm.http import HttpClient

        return HttpClient(backend_cfg, cache_dir)
    if backend_cfg.backend == "replay":
        from nlistral.llm.replay import ReplayClient

        return ReplayClient(backend_cfg)
    raise ConfigError(f"unknown LLM backend {backend_cfg.backend!r} (choose from {', '.join(BACKENDS)})")
