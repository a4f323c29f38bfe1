"""The model server a stage starts (serving.py) against a busy port, a proxy and a killed stage (issue 31, items 3
and 6), with real processes.

Bugs these catch, each seen failing on main: with eval.server.port set, a server already on that port that lists the
model answered the evaluation in place of ours (its replies cached under our model's key); `kill -9` of the stage
left its server running (its own session, PPID 1, holding the GPU); HTTP_PROXY carried the readiness probe to a
proxy, so our own server was never seen ready.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from llm_server import LLMServer
from omegaconf import OmegaConf
from test_evaluate import assert_server_gone

from nlistral.errors import ConfigError
from nlistral.serving import running_server

# A stand-in for `vllm serve`: starts a worker of its own (as vLLM does), writes both pids to ./pids, then lists the
# model "m" at GET /v1/models on the port it is given.
SERVE = textwrap.dedent("""
    import http.server, json, os, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open("pids", "w").write("%d %d" % (os.getpid(), child.pid))
    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models).serve_forever()
""")
ESCAPED = SERVE.replace("{", "{{").replace("}", "}}")  # the command's {fields} are filled in: keep the dict's braces
COMMAND = f"{shlex.quote(sys.executable)} -c {shlex.quote(ESCAPED)} {{port}}"


def server_cfg(**settings):
    return OmegaConf.create({"base_url": None, "port": None, "ready_timeout_s": 60, **settings})


def test_a_busy_port_is_refused_before_starting_and_the_other_server_is_never_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with LLMServer(models=["m"]) as other:
        port = int(other.url.split(":")[-1].split("/")[0])
        refused = pytest.raises(ConfigError, match=rf"eval\.server\.port={port} is already in use")
        with refused, running_server(server_cfg(port=port), COMMAND, {}, "m"):
            pass
        assert sum(other.counts.values()) == 0
    assert not Path("pids").exists()  # our command never started


def test_proxy_variables_do_not_hide_our_own_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = socket.create_server(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with running_server(server_cfg(ready_timeout_s=30), COMMAND, {}, "m") as url:
        assert url.startswith("http://127.0.0.1:")
    assert_server_gone(*map(int, Path("pids").read_text().split()))


STAGE = textwrap.dedent("""
    import sys, time
    from omegaconf import OmegaConf
    from nlistral.serving import running_server
    cfg = OmegaConf.create({"base_url": None, "port": None, "ready_timeout_s": 60})
    with running_server(cfg, sys.argv[1], {}, "m") as url:
        print("ready", url, flush=True)
        time.sleep(600)
""")


def test_sigkill_of_the_stage_takes_its_server_group_down(tmp_path):
    """A `kill -9` gives the stage no chance to stop anything: the watchdog must."""
    stage = subprocess.Popen([sys.executable, "-c", STAGE, COMMAND], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        while not (line := stage.stdout.readline()).startswith("ready"):  # served and listed: the server runs
            assert line, "the stage ended before its server was ready"
        leader, child = map(int, (tmp_path / "pids").read_text().split())
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        assert_server_gone(leader, child)
    finally:
        stage.kill()
        stage.wait()


def test_the_servers_key_is_not_printed_nor_in_its_error(tmp_path, monkeypatch, capsys):
    """vLLM logs its non-default args, `--api-key` included, and exits on a bad flag: on main the key was printed in
    "server: started `...`" and again in the ConfigError's last lines of the server's log (stdout of `dvc repro`, CI
    logs)."""
    monkeypatch.chdir(tmp_path)
    dies = "import sys; print('non-default args:', dict(api_key=sys.argv[2])); sys.exit(1)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(dies)} --api-key SECRET-KEY-1 --port {{port}}"
    with pytest.raises(ConfigError, match="exited with code 1") as err, running_server(server_cfg(), command, {}, "m"):
        pass
    shown = str(err.value) + capsys.readouterr().out
    assert "SECRET-KEY-1" not in shown and "--api-key ***" in shown and "non-default args:" in shown
