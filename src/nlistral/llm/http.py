"""Mistral's chat API and OpenAI-compatible servers (vLLM, Ollama, llama.cpp, OpenAI) over `requests`.

One client per stage, shared by its worker threads: a Limiter paces every request, `send` retries 429, 5xx,
timeouts, connection errors and unreadable bodies with exponential backoff and jitter (a 429 pauses the whole
client for its Retry-After), 401 stops the stage, other 4xx fail the row at once. Every attempt has a deadline:
`timeout_s` for the whole response (each socket read is bounded by it too, so a server that trickles its answer fails
within ~2x timeout_s), and a body over `max_response_bytes` fails the row. A server that asks to wait (Retry-After,
x-ratelimit-reset) longer than `max_wait_s` fails that row and every later one unsent, with the reason. Waiting for
another thread's or process's identical request (the cache's claim) is bounded by the longest a request can take.
A stop (401, Ctrl-C) wakes every thread waiting for the limiter or a retry, and none of them sends anything more.
`chat` answers from the reply cache when it can and stores every paid reply as soon as it arrives.

The API key lives only in the Authorization header: it is never logged, put in an error message, or cached; it is
sent only where llm/urls.py's `key_refusal` allows (a ConfigError before any request otherwise), and requests to
loopback never go through a proxy.
"""

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
import urllib3
from dotenv import load_dotenv
from filelock import Timeout as LockTimeout

from nlistral.errors import ConfigError
from nlistral.llm.base import Reply, RequestFailed, Tally
from nlistral.llm.budget import Budget
from nlistral.llm.cache import ReplyCache
from nlistral.llm.limiter import Limiter
from nlistral.llm.urls import key_refusal, session_for
from nlistral.redact import redacted

log = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"
# api_key_env names a variable, in capitals (MISTRAL_API_KEY): anything else may be the key itself, which the error
# messages that name the variable would then print.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
MAX_WAIT_S = 300.0  # defaults of max_wait_s and max_response_bytes for configs without them (conf/llm/common.yaml)
MAX_RESPONSE_BYTES = 4_000_000
READ_CHUNK = 65536


def parse_completion(raw: str) -> Reply:
    """A chat completion body (Mistral and OpenAI share the shape) -> Reply; ValueError if it is not one."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        if isinstance(content, list):  # Mistral's chunked content: keep the text chunks, drop e.g. "thinking"
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        usage = data.get("usage") or {}
        steps = (choice.get("logprobs") or {}).get("content")
        return Reply(
            str(content),
            choice.get("finish_reason"),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            logprobs=[
                (
                    s["token"],
                    {t["token"]: float(t["logprob"]) for t in s.get("top_logprobs") or ()}
                    | {s["token"]: float(s["logprob"])},
                )
                for s in steps
            ]
            if steps
            else None,  # fmt: skip
        )
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as err:
        raise ValueError(f"not a chat completion ({type(err).__name__})") from None


def _seconds(value: str | None) -> float | None:
    """'2', '0.5', '20ms', '1s', '6m0s', '1h2m' -> seconds; None if unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: Retry-After (seconds or HTTP date) or retry-after-ms."""
    if (ms := _seconds(headers.get("retry-after-ms"))) is not None:
        return ms / 1000
    value = headers.get("retry-after")
    if (seconds := _seconds(value)) is not None:
        return seconds
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def exhausted_wait(headers) -> float:
    """Seconds until an exhausted `x-ratelimit-remaining-*` budget resets, from its `x-ratelimit-reset-*`."""
    wait = 0.0
    for name, value in headers.items():
        name = name.lower()
        remaining = _seconds(value) if name.startswith("x-ratelimit-remaining") else None
        if remaining is not None and remaining <= 0:
            wait = max(wait, _seconds(headers.get(name.replace("remaining", "reset"))) or 0.0)
    return wait


@dataclass(frozen=True)
class _Retry:
    """Why an attempt got no usable reply, and how long the server asked us to wait (a 429)."""

    cause: str  # one of base.RETRY_CAUSES
    detail: str
    server_wait: float | None = None


def _estimate_tokens(body: dict) -> int:
    """Before sending: ~4 characters a token for the prompt, plus the most the reply may use."""
    return sum(len(m["content"]) // 4 + 4 for m in body["messages"]) + body["max_tokens"]


class HttpClient:
    """A `Client` (llm/base.py). What the batch transport (llm/batch.py) also uses: `body`, `key`, `send`, `mask`,
    `tally`, `model`, `base_url`."""

    def __init__(self, cfg, cache: ReplyCache, budget: Budget | None = None):
        if not cfg.base_url:
            raise ConfigError(f"the {cfg.backend} backend needs base_url (e.g. https://api.mistral.ai/v1)")
        if cfg.api_key_env and not ENV_NAME.fullmatch(str(cfg.api_key_env)):  # never echo the value
            raise ConfigError(
                "api_key_env must name an environment variable in capitals (e.g. MISTRAL_API_KEY), not hold the key"
            )
        self.backend = cfg.backend
        self.model = cfg.model
        self.base_url = str(cfg.base_url).rstrip("/")
        self.shown_url = redacted(self.base_url)  # in messages and failed rows: no user:pass@ of the URL
        self.api_key_env = cfg.api_key_env
        self.cfg = cfg
        self.max_retries = cfg.max_retries
        self.timeout_s = cfg.timeout_s
        self.max_wait_s = cfg.get("max_wait_s", MAX_WAIT_S)
        self.max_response_bytes = cfg.get("max_response_bytes", MAX_RESPONSE_BYTES)
        # the longest one request can take (each try: its deadline, a last read, a wait): how long a claim is awaited
        self.claim_wait_s = (self.max_retries + 1) * (2 * self.timeout_s + max(cfg.backoff_max_s, self.max_wait_s))
        self.limiter = Limiter(cfg.requests_per_second, cfg.tokens_per_minute)
        self._cache = cache
        self._budget = budget
        self.tally = Tally()
        self._headers: dict | None = None  # set by _ensure_ready, holds the key
        self._secret: str | None = None
        self._ready_lock = threading.Lock()
        self._stop = threading.Event()  # every thread gives up: on a 401 or a bad model (with _fatal), or Ctrl-C
        self._fatal: str | None = None
        self._gave_up: RequestFailed | None = None  # the server asked for a wait over max_wait_s: no row is sent
        self._local = threading.local()
        self._sessions: list[requests.Session] = []

    # --- what is asked -------------------------------------------------------------------------------------------
    def body(self, messages: list[dict], sample: int = 0) -> dict:
        cfg = self.cfg
        body: dict = {
            "model": self.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens
        }  # fmt: skip
        seed = cfg.seed + sample if cfg.seed is not None else (sample or None)
        if seed is not None:
            body["random_seed" if self.backend == "mistral" else "seed"] = seed
        if cfg.response_format:
            body["response_format"] = {"type": cfg.response_format}
        if cfg.get("stop"):  # the student's label-first tasks (nlistral.evaluation)
            body["stop"] = list(cfg.stop)
        if cfg.get("top_logprobs"):  # the student's: its label's probability (nlistral.confidence)
            body |= {"logprobs": True, "top_logprobs": cfg.top_logprobs}
        return body

    def key(self, body: dict) -> str:
        """Cache key: the endpoint and the whole request body (model, messages, generation params). A config's
        `cache_namespace` stands in for the endpoint: what the model name does not pin and the URL need not (the
        student's: the adapter's content digest and the server command, on whatever port it was started)."""
        where = {"namespace": ns} if (ns := self.cfg.get("cache_namespace")) else {"url": self.base_url + CHAT_PATH}
        asked = json.dumps({**where, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(asked.encode()).hexdigest()

    # --- chat ----------------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], sample: int = 0) -> Reply:
        """The reply to `messages` (sample i > 0: the same request with seed + i), from the cache or the server."""
        body = self.body(messages, sample)
        key = self.key(body)
        claim = self._cache.claim(key)  # identical requests in flight at once, here or elsewhere, are paid once
        try:
            held = claim.acquire(timeout=self.claim_wait_s)
        except LockTimeout:
            detail = f"the same request was in flight elsewhere for {self.claim_wait_s:.0f} s (lock {claim.lock_file})"
            raise RequestFailed("claim_timeout", f"{detail}; re-run later") from None
        with held:
            if (raw := self._cache.get(key)) is not None:
                return replace(parse_completion(raw), cached=True)
            budget = self._budget
            worst = budget.worst(messages, body["max_tokens"]) if budget else 0.0
            raw, reply = self.send(
                "POST", CHAT_PATH, parse=_chat_reply, tokens=_estimate_tokens(body), worst_usd=worst,
                bill=lambda value: budget.cost(value[1].prompt_tokens, value[1].completion_tokens) if budget else 0.0,
                json=body,
            )  # fmt: skip
            self._cache.put(key, json.dumps(body, ensure_ascii=False), raw)  # dropped if the stage already stopped
            return reply

    def is_cached(self, messages: list[dict], sample: int = 0) -> bool:
        return self._cache.get(self.key(self.body(messages, sample))) is not None

    def cached_completion_tokens(self) -> tuple[float, int]:
        return self._cache.completion_tokens(self.model)

    # --- setup: key and model, checked before the first request (a fully cached run needs neither) ----------------
    def _ensure_ready(self) -> None:
        with self._ready_lock:
            if self._headers is not None:
                return
            self._headers = self._auth_headers()
            try:
                self._check_model()
            except ConfigError as err:
                self._halt(str(err))
                raise

    def _auth_headers(self) -> dict:
        load_dotenv(Path(".env"))  # the repo root's .env; variables already set win
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key:
            if self.backend == "mistral":
                raise ConfigError(
                    f"the mistral backend needs an API key: environment variable {self.api_key_env} is not set "
                    f"(export it, or put {self.api_key_env}=... in .env)"
                )
            return {}
        if refusal := key_refusal(self.api_key_env, self.base_url):
            raise ConfigError(f"{self.backend} backend: not sending the API key: {refusal}")
        self._secret = key
        return {"Authorization": f"Bearer {key}"}

    def _check_model(self) -> None:
        """Stop early if GET /models answers and does not list the configured model.

        Ollama lists its models with a tag (`mistral:latest`) and serves `mistral` as `mistral:latest`: that counts.
        """
        try:
            listing = self._request("GET", "/models", parse=_model_ids, retries=0)
        except RequestFailed as err:
            log.info("%s/models did not list models (%s); not checking model %r", self.shown_url, err, self.model)
            return
        served = set(listing)
        if self.model not in served and f"{self.model}:latest" not in served:
            raise ConfigError(
                f"model {self.model!r} is not served by {self.shown_url}; it serves: {', '.join(sorted(served))}"
            )

    def _halt(self, message: str) -> ConfigError:
        self._fatal = message
        self.stop()
        return ConfigError(message)

    def _auth_error(self) -> ConfigError:
        if not self.api_key_env:
            return self._halt(f"{self.shown_url} requires an API key (HTTP 401): set api_key_env and that variable")
        if not self._secret:  # the openai backend sends no key when its variable is unset
            return self._halt(
                f"{self.shown_url} requires an API key (HTTP 401) and environment variable {self.api_key_env} is "
                f"not set (export it, or put {self.api_key_env}=... in .env)"
            )
        return self._halt(
            f"{self.shown_url} refused the API key in environment variable {self.api_key_env} (HTTP 401): "
            "check that it is valid and active"
        )

    def _stopped(self) -> Exception:
        if self._fatal:
            return ConfigError(self._fatal)
        return RequestFailed("interrupted", "the stage was stopped")

    # --- one HTTP call, with retries -----------------------------------------------------------------------------
    def send(self, method: str, path: str, *, parse: Callable[[requests.Response], tuple[Any, int]], tokens: int = 0,
             worst_usd: float = 0.0, bill: Callable[[Any], float] | None = None, capped: bool = True,
             **kwargs) -> Any:  # fmt: skip
        """Send until `parse(response) -> (value, tokens used)` accepts a 2xx response; return the value. The first
        call checks the key and the model.

        `tokens` is the limiter's estimate; with a budget, each attempt reserves `worst_usd` and is billed
        `bill(value)` (see llm/budget.py). `capped=False` (a batch results file, which grows with the rows) lifts the
        whole-response deadline and max_response_bytes; each read stays bounded by timeout_s. `kwargs` go to
        `requests`. Raises ConfigError on 401 (and in every thread after it), RequestFailed when retries run out, the
        server refuses the request (other 4xx), asks for a wait over max_wait_s, or the budget is spent.
        """
        self._ensure_ready()
        return self._request(method, path, parse=parse, tokens=tokens, worst_usd=worst_usd, bill=bill, capped=capped,
                             **kwargs)  # fmt: skip

    def _request(self, method: str, path: str, *, parse, tokens: int = 0, worst_usd: float = 0.0, bill=None,
                 retries: int | None = None, capped: bool = True, **kwargs) -> Any:  # fmt: skip
        retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            value, retry = self._attempt(method, path, parse, tokens, worst_usd, bill, capped, kwargs)
            if retry is None:
                return value
            if attempt == retries:
                raise RequestFailed(retry.cause, f"{retry.detail} (after {retries} retries)")
            self.tally.add(f"retries_{retry.cause}")
            delay = self._backoff(attempt)
            if retry.cause == "rate_limited":  # slow every thread, not just this request
                self._server_wait(retry.server_wait if retry.server_wait is not None else delay, retry.detail)
                delay = 0.0
            self._stop.wait(delay)
            attempt += 1

    def _attempt(self, method: str, path: str, parse, tokens: int, worst_usd: float, bill, capped: bool, kwargs: dict):
        """One try: -> (value, None), or (None, why to try again); raises what trying again cannot help."""
        budget = self._budget
        held = budget.reserve(worst_usd) if worst_usd and budget else None
        ticket, used, cost = None, 0, 0.0
        try:  # whatever happens below, the limiter and the budget learn what this attempt used
            if self._gave_up:
                raise RequestFailed(self._gave_up.reason, self._gave_up.detail)  # one exception per thread
            if self._stop.is_set() or (ticket := self.limiter.acquire(tokens)) is None or self._stop.is_set():
                raise self._stopped()  # stopped before or while it waited for its turn: send nothing
            if path == CHAT_PATH:
                self.tally.add("requests")
            cost = worst_usd  # until the server says otherwise, it may have billed this request
            deadline = time.monotonic() + self.timeout_s
            try:
                with self._session().request(method, self.base_url + path, headers=self._headers,
                                             timeout=self.timeout_s, stream=True, **kwargs) as resp:  # fmt: skip
                    self._read(resp, deadline if capped else float("inf"), capped)
            except requests.Timeout:
                return None, _Retry("timeout", f"no complete response within timeout_s={self.timeout_s}")
            except requests.RequestException as err:
                return None, _Retry("connection", f"connection failed ({type(err).__name__})")
            if not resp.ok:
                cost = 0.0  # refused requests are not billed
                return None, self._refused(resp, method, path)
            try:
                value, used = parse(resp)
            except (ValueError, KeyError, TypeError, IndexError):
                return None, _Retry("bad_response", f"HTTP {resp.status_code}, unreadable body: {self._snippet(resp)}")
            cost = bill(value) if held is not None else 0.0
            if reset_wait := exhausted_wait(resp.headers):
                self._server_wait(reset_wait, "x-ratelimit-remaining is 0", value)
            return value, None
        finally:
            if ticket is not None:
                self.limiter.settle(ticket, used)
            if budget is not None and held is not None:
                budget.settle(held, cost)

    def _read(self, resp: requests.Response, deadline: float, capped: bool) -> None:
        """Read the body into `resp` (so .text and .json() work) by `deadline`, at most max_response_bytes of it
        (`capped`)."""
        chunks, size = [], 0
        try:
            while chunk := resp.raw.read1(READ_CHUNK, decode_content=True):  # what one socket read brings
                size += len(chunk)
                if capped and size > self.max_response_bytes:
                    raise RequestFailed("too_large", f"response body over max_response_bytes={self.max_response_bytes}")
                if time.monotonic() > deadline:
                    raise requests.Timeout()
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError:
            raise requests.Timeout() from None
        except urllib3.exceptions.HTTPError as err:  # a reset, a broken chunked encoding, a bad gzip stream
            raise requests.ConnectionError(type(err).__name__) from None
        resp._content = b"".join(chunks)  # what requests' own .content would hold

    def _server_wait(self, seconds: float, why: str, value=None) -> None:
        """Hold every thread back `seconds`, as the server asked; over max_wait_s, give up: this request fails (or,
        answered, is the last one) and no row is sent after it."""
        if seconds <= self.max_wait_s:
            if seconds >= 10:
                log.warning("%s asked to wait %.0f s (%s): every request waits", self.shown_url, seconds, why[:80])
            self.limiter.pause(seconds)
            return
        detail = f"{self.shown_url} asked to wait {seconds:.0f} s, over max_wait_s={self.max_wait_s:g} ({why[:120]})"
        self._gave_up = RequestFailed("rate_limited", f"{detail}; no more requests sent: re-run later")
        log.warning("%s", self._gave_up.detail)
        if value is None:
            raise RequestFailed(self._gave_up.reason, self._gave_up.detail)

    def _refused(self, resp: requests.Response, method: str, path: str) -> "_Retry":
        """A non-2xx response: 429 and 5xx are worth another try; a 401 stops the stage, other 4xx fail the row."""
        if resp.status_code == 401:
            raise self._auth_error()
        if resp.status_code == 429:
            self.tally.add("http_429")
            wait = max(retry_after(resp.headers) or 0.0, exhausted_wait(resp.headers)) or None
            return _Retry("rate_limited", f"HTTP 429: {self._snippet(resp)}", wait)
        if resp.status_code >= 500:
            return _Retry("server_error", f"HTTP {resp.status_code}: {self._snippet(resp)}")
        raise RequestFailed(f"http_{resp.status_code}", f"{method} {path}: {self._snippet(resp)}")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half the capped delay, plus up to the other half at random."""
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def mask(self, text: str) -> str:
        """`text` (something a server sent) with the API key, should it be there, replaced by ***."""
        return text.replace(self._secret, "***") if self._secret else text

    def _snippet(self, resp) -> str:
        return " ".join(self.mask(resp.text)[:300].split())  # masked before cutting: no partial key survives

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = session_for(self.base_url)
            self._sessions.append(session)
        return session

    def stop(self) -> None:
        """Make every thread give up now: those waiting for the limiter or a retry send nothing more (Ctrl-C)."""
        self._stop.set()
        self.limiter.cancel()
        if self._budget:
            self._budget.cancel()

    def close(self) -> None:
        for session in self._sessions:
            session.close()
        self._cache.close()


def _model_ids(resp):
    """GET /models -> the ids and aliases it lists (OpenAI: data[].id; Mistral adds data[].aliases)."""
    data = resp.json()["data"]
    return [m["id"] for m in data] + [a for m in data for a in m.get("aliases") or ()], 0


def _chat_reply(resp):
    reply = parse_completion(resp.text)
    return (resp.text, reply), reply.prompt_tokens + reply.completion_tokens
