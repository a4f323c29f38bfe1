"""Prompt token counts for `nlistral estimate`, per the backend's `tokenizer` setting.

- `tekken`: Mistral's own tokenizer (Tekken, tekken_240911.json as shipped in mistral-common: the tokenizer of
  Ministral 8B, Mistral Small 3.x and Nemo) over each message's text, plus a BOS and 2 control tokens per message
  ([INST]/[/INST] or [SYSTEM_PROMPT]/[/SYSTEM_PROMPT]); the exact chat template differs between model versions by
  a few tokens a request.
- `approx`: 4 characters a token over all message text (what the loopback test server bills).
"""

from functools import lru_cache
from pathlib import Path

from nlistral.errors import ConfigError

TOKENIZERS = ("approx", "tekken")
TEKKEN_FILE = "tekken_240911.json"


@lru_cache(maxsize=1)
def _tekken():
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(Path(mistral_common.__file__).parent / "data" / TEKKEN_FILE)


def prompt_counter(tokenizer: str):
    """A function messages -> prompt tokens."""
    if tokenizer == "approx":
        return lambda messages: sum(len(m["content"]) for m in messages) // 4
    if tokenizer == "tekken":
        tekken = _tekken()
        return lambda messages: 1 + sum(len(tekken.encode(m["content"], bos=False, eos=False)) + 2 for m in messages)
    raise ConfigError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(TOKENIZERS)})")
