"""The LLM backends behind the one client seam (llm/base.py: the `Client` protocol); `engine.generate` drives them.

Backends (`backend:` in conf/teacher, conf/reflector): `offline` (llm/offline.py, a free stand-in), `mistral` and
`openai` (llm/http.py: Mistral's API or any OpenAI-compatible server, with retries, rate limits and a reply cache),
`replay` (llm/replay.py: answers recorded in an outputs file, e.g. the study's).
"""

from nlistral.errors import ConfigError
from nlistral.llm.base import Client
from nlistral.llm.budget import Budget

BACKENDS = ("offline", "mistral", "openai", "replay")


def make_client(backend_cfg, cache_dir, budget: Budget | None = None) -> Client:
    """The client for a `teacher`/`reflector` config subtree; HTTP clients cache replies under `cache_dir` and
    spend within `budget` (offline and replay are free)."""
    if backend_cfg.backend == "offline":
        from nlistral.llm.offline import OfflineClient

        return OfflineClient()
    if backend_cfg.backend in ("mistral", "openai"):
        from nlistral.llm.cache import ReplyCache
        from nlistral.llm.http import HttpClient

        return HttpClient(backend_cfg, ReplyCache(cache_dir), budget)
    if backend_cfg.backend == "replay":
        from nlistral.llm.replay import ReplayClient

        return ReplayClient(backend_cfg)
    raise ConfigError(f"unknown LLM backend {backend_cfg.backend!r} (choose from {', '.join(BACKENDS)})")
