"""The LLM client against hostile or careless endpoints (issue 31, items 4-6 and 9), each attack made for real on
127.0.0.1 (and on this machine's non-loopback address, as a LAN server would be).

- Keys (item 4): on main the openai profile sent the exported OPENAI_API_KEY to whatever base_url it had (its
  default, a local vLLM, included) and any key over plain http:// to another machine.
- Proxies (item 6): requests honours HTTP_PROXY for 127.0.0.1 when NO_PROXY is unset: every loopback request went
  to the proxy (here a dead port, so none arrived).
- Hangs (item 5): timeout_s bounded each socket read, not the request (a trickling server's reply took minutes and
  succeeded); Retry-After / x-ratelimit-reset waits were unbounded (a day's wait held every thread); bodies had no
  size cap; the cache's claim lock waited forever. On main these tests hang (their threads are joined with a
  generous bound) or find no max_response_bytes key.
- Storage (item 9): a corrupt replies.sqlite and a failed write (a file size limit, as a full disk fails it) were
  sqlite3 tracebacks.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from llm_server import KEY, ROWS, LLMServer, completion, stage_overrides, write_split

from nlistral import cli
from nlistral.config import load_config
from nlistral.errors import ConfigError, StageError
from nlistral.io import read_jsonl
from nlistral.llm.base import RequestFailed
from nlistral.llm.cache import ReplyCache
from nlistral.llm.http import HttpClient
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"
FAILED = "data/original_thoughts/train_failed.jsonl"
HANG_BOUND_S = 120  # only a hang (main's behaviour) gets near this


@pytest.fixture
def server(workdir, monkeypatch):
    for name in ("MISTRAL_API_KEY", "OPENAI_API_KEY", "MY_SERVER_KEY"):
        monkeypatch.setenv(name, KEY)
    write_split(workdir, ROWS)
    with LLMServer() as srv:
        yield srv


def run(url, backend="openai", **settings) -> dict:
    return thoughts.run(load_config(stage_overrides("teacher", url, backend, **settings)), "train")


class Capture:
    """A TCP listener on this machine's non-loopback address that records every connection's first bytes."""

    def __init__(self):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this picks the outgoing interface's address
        host = probe.getsockname()[0]
        probe.close()
        if host.startswith("127."):
            pytest.skip("this machine has no non-loopback address")
        self.sock = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        self.received: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")


def test_the_openai_profile_sends_no_key_to_its_default_local_server(server):
    """The profile's default base_url is a local server: an exported OPENAI_API_KEY stays home."""
    assert run(server.url)["ok"] == len(ROWS)
    assert set(server.auth) == {None}


def test_a_key_of_the_users_own_goes_to_the_server_it_was_set_for(server):
    assert run(server.url, api_key_env="MY_SERVER_KEY")["ok"] == len(ROWS)
    assert set(server.auth) == {f"Bearer {KEY}"}


@pytest.mark.parametrize(("backend", "variable", "scheme", "said"), [
    ("openai", "OPENAI_API_KEY", "http", "plain http://"),
    ("mistral", "MISTRAL_API_KEY", "http", "plain http://"),
    ("openai", "MY_SERVER_KEY", "http", "plain http://"),
    ("openai", "OPENAI_API_KEY", "https", "OPENAI_API_KEY holds api.openai.com's key"),
    ("mistral", "MISTRAL_API_KEY", "https", "MISTRAL_API_KEY holds api.mistral.ai's key"),
])  # fmt: skip
def test_no_key_leaves_for_another_machine_in_clear_or_for_the_wrong_host(server, backend, variable, scheme, said):
    capture = Capture()
    url = capture.url.replace("http://", f"{scheme}://")
    with pytest.raises(ConfigError, match=said) as err:
        run(url, backend, api_key_env=variable)
    assert KEY not in str(err.value)
    assert not any(KEY.encode() in got for got in capture.received) and capture.received == []


def test_proxy_variables_never_carry_loopback_requests(server, monkeypatch):
    dead = socket.create_server(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    metrics = run(server.url, api_key_env="MY_SERVER_KEY", max_retries=0)
    assert metrics["ok"] == len(read_jsonl(OUT)) == len(ROWS) == server.counts["chat"]


def finishes(call):
    """`call()`'s result or exception, from a thread given HANG_BOUND_S: a hang fails the test instead of the run."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(HANG_BOUND_S)
    assert not worker.is_alive(), f"still waiting after {HANG_BOUND_S} s"
    return outcome


class Trickle(BaseHTTPRequestHandler):
    """Lists test-model; answers a chat completion one byte every 20 ms (each read well within timeout_s)."""

    def do_GET(self):
        self._send(json.dumps({"data": [{"id": "test-model"}]}).encode(), 0)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(json.dumps(completion({"messages": [], "model": "test-model"}, "x" * 200)).encode(), 0.02)

    def _send(self, body: bytes, pause: float):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            time.sleep(pause)

    def log_message(self, *args):
        pass


def client(workdir, url, **settings) -> HttpClient:
    cfg = load_config(stage_overrides("teacher", url, "openai", **settings)).teacher
    return HttpClient(cfg, ReplyCache(workdir / "cache"))


def test_a_trickling_server_fails_the_request_at_its_deadline(workdir):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        llm = client(workdir, f"http://127.0.0.1:{httpd.server_address[1]}/v1", timeout_s=1, max_retries=0)
        outcome = finishes(lambda: llm.chat([{"role": "user", "content": "hi"}]))
        assert isinstance(outcome.get("error"), RequestFailed) and outcome["error"].reason == "timeout", outcome
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("headers", [
    {"Retry-After": "86400"},
    {"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"},
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "999h"},
])  # fmt: skip
def test_a_wait_over_max_wait_s_fails_the_rows_at_once_with_the_reason(server, headers):
    server.faults = [{"status": 429, "headers": headers}] * 10
    outcome = finishes(lambda: run(server.url, "mistral"))
    assert isinstance(outcome.get("error"), StageError), outcome
    failed = read_jsonl(FAILED)
    assert len(failed) == len(ROWS) and {r["reason"] for r in failed} == {"rate_limited"}
    assert all("over max_wait_s=300" in r["error"] for r in failed), failed[0]
    assert server.counts["chat"] == 1  # the first answer said to stay away: nothing more was sent


def test_an_oversized_reply_is_refused(server):
    server.reply = lambda body: "x" * 300_000
    outcome = finishes(lambda: run(server.url, "mistral", max_response_bytes=100_000))
    assert isinstance(outcome.get("error"), StageError), outcome
    assert {r["reason"] for r in read_jsonl(FAILED)} == {"too_large"}
    assert ReplyCache(".cache/llm").completion_tokens("test-model") == (0.0, 0)  # nothing stored


def test_a_claim_held_elsewhere_is_awaited_only_as_long_as_a_request_can_take(server, workdir):
    llm = client(workdir, server.url, api_key_env="MY_SERVER_KEY", timeout_s=1, max_retries=0, max_wait_s=1,
                 backoff_max_s=0.5)  # fmt: skip
    messages = [{"role": "user", "content": "hi"}]
    lock = workdir / "cache" / "claims" / f"{llm.key(llm.body(messages))[:2]}.lock"
    hold = f"from filelock import FileLock; held = FileLock({str(lock)!r}); held.acquire(); print('held', flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", f"{hold}; import time; time.sleep(600)"], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        outcome = finishes(lambda: llm.chat(messages))
        assert isinstance(outcome.get("error"), RequestFailed) and outcome["error"].reason == "claim_timeout"
        assert str(lock) in outcome["error"].detail and server.counts["chat"] == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_corrupt_reply_cache_exits_2_naming_the_file(server, capsys):
    cache = Path(".cache/llm/replies.sqlite")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"this is not a database" * 100)
    assert cli.main(["thoughts", "--split", "train", *stage_overrides("teacher", server.url, "mistral")]) == 2
    err = capsys.readouterr().err
    assert str(cache.resolve()) in err or str(cache) in err
    assert "unreadable" in err and "move it away" in err and "Traceback" not in err
    assert server.counts["chat"] == 0


FULL_DISK = """
import resource, signal, sys
from nlistral import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failed_cache_write_exits_2_naming_the_file_and_what_to_do(server, workdir):
    server.reply = lambda body: "x" * 300_000  # the first paid reply is larger than the file may grow
    args = ["thoughts", "--split", "train", *stage_overrides("teacher", server.url, "mistral")]
    done = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=HANG_BOUND_S)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "replies.sqlite: cannot write the reply cache" in done.stderr and "Free space" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("backend", "variable", "scheme", "behind"), [
    ("openai", "MY_SERVER_KEY", "http", "127.0.0.1:9"),
    ("mistral", "MISTRAL_API_KEY", "https", "api.mistral.ai"),
])  # fmt: skip
def test_a_backslash_cannot_make_the_key_check_read_another_host_than_requests_connects_to(
    server, backend, variable, scheme, behind
):
    """`http://HOST\\@127.0.0.1/v1`: urllib.parse reads host 127.0.0.1 (after the `@`), urllib3 (what requests
    connects with) ends the host at the backslash, HOST. On main key_refusal checked urllib.parse's host: the key went
    over plain http to another machine, and MISTRAL_API_KEY to a host that is not api.mistral.ai."""
    capture = Capture()
    url = capture.url.replace("http://", f"{scheme}://").replace("/v1", f"\\@{behind}/v1")
    with pytest.raises(ConfigError, match="not sending the API key") as err:
        run(url, backend, api_key_env=variable, max_retries=0)
    assert KEY not in str(err.value)
    assert capture.received == []


def test_a_name_under_localhost_is_not_this_machine():
    """`evil.localhost` is looked up in DNS by this system's resolver (glibc maps only `localhost` itself): on main
    any `*.localhost` counted as loopback, so a key went there over plain http, past any proxy."""
    from nlistral.llm.urls import is_loopback, key_refusal

    assert not is_loopback("http://evil.localhost:8000/v1")
    assert "plain http://" in key_refusal("MY_SERVER_KEY", "http://evil.localhost:8000/v1")
    assert is_loopback("http://localhost:8000/v1") and is_loopback("http://[::1]:8000/v1")


def test_a_password_in_base_url_stays_out_of_messages_and_failed_rows(workdir):
    """A base_url with user:pass@ (a server behind basic auth): on main the errors and the failed rows' details
    (data/original_thoughts/train_failed.jsonl, a DVC output) quoted the URL whole."""
    write_split(workdir, ROWS)
    with LLMServer(models=("another-model",)) as srv:
        with pytest.raises(ConfigError, match="is not served by http://127.0.0.1") as err:
            run(srv.url.replace("http://", "http://user:PASS-2@"))
        assert "PASS-2" not in str(err.value)
    with LLMServer() as srv:
        srv.faults = [{"status": 429, "headers": {"Retry-After": "86400"}}] * 10
        outcome = finishes(lambda: run(srv.url.replace("http://", "http://user:PASS-2@")))
    assert isinstance(outcome.get("error"), StageError), outcome
    assert "over max_wait_s" in Path(FAILED).read_text(encoding="utf-8")
    assert "PASS-2" not in Path(FAILED).read_text(encoding="utf-8")
