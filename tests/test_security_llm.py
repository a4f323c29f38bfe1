"""The LLM client against hostile or careless endpoints (issue 31, items 4-6 and 9), each attack made for real on
127.0.0.1 (and on this machine's non-loopback address, as a LAN server would be).

- Keys (item 4): on main the openai profile sent the exported OPENAI_API_KEY to whatever base_url it had (its
  default, a local vLLM, included) and any key over plain http:// to another machine.
- Proxies (item 6): requests honours HTTP_PROXY for 127.0.0.1 when NO_PROXY is unset: every loopback request went
  to the proxy (here a dead port, so none arrived).
"""

import socket
import threading

import pytest
from llm_server import KEY, ROWS, LLMServer, stage_overrides, write_split

from nlistral.config import ConfigError, load_config
from nlistral.io import read_jsonl
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"


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
