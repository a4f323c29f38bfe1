"""The one LLM client seam: every backend answers `chat(messages) -> Reply`; `engine.generate` drives them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def make_client(backend_cfg):
    """The client for a `teacher`/`reflector` config subtree."""
    if backend_cfg.backend == "offline":
        from nlistral.llm.offline import OfflineClient

        return OfflineClient()
    raise ValueError(f"unknown LLM backend {backend_cfg.backend!r}")
