"""A model server the evaluate stages run themselves (`eval.server.command`, e.g. `vllm serve ...`).

`running_server` starts the command in its own process group with its output in a log file, waits until GET
/v1/models lists the model (bounded by `eval.server.ready_timeout_s`; an early exit or the timeout is a ConfigError
with the log's last lines: exit 2), yields the base URL, and stops the whole group when the block ends, however it
ends (success, error, Ctrl-C): SIGTERM, then SIGKILL after STOP_GRACE_S. Without a command it yields
`eval.server.base_url`, a server someone else runs.
"""

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from nlistral.errors import ConfigError

FIELDS = ("base", "revision", "tokenizer", "name", "adapter", "rank", "port")
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 20


def command_args(template: str, fields: dict) -> list[str]:
    """The command line: `template` split like a shell would, then each word's {field}s filled in (paths with spaces
    stay one word). An unknown or unavailable field is a ConfigError naming it."""
    try:
        words = shlex.split(template)
        return [word.format(**fields) for word in words]
    except KeyError as err:
        hint = "" if "adapter" in fields else "; evaluate_base serves no adapter: set eval.server.base_command"
        raise ConfigError(f"eval.server command {template!r}: field {{{err.args[0]}}} is not available here "
                          f"(fields: {', '.join(f for f in FIELDS if f in fields)}){hint}") from None  # fmt: skip
    except (ValueError, IndexError) as err:
        raise ConfigError(f"eval.server command {template!r}: {err}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(log: Path) -> str:
    with open(log, encoding="utf-8", errors="replace") as handle:
        return "".join(deque(handle, LOG_TAIL_LINES)).rstrip()


def _lists(base_url: str, model: str) -> bool:
    try:
        resp = requests.get(f"{base_url}/models", timeout=5)
        return resp.ok and model in {m.get("id") for m in resp.json().get("data", [])}
    except (requests.RequestException, ValueError, AttributeError):
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left of it after STOP_GRACE_S (children too), reap the leader."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_S)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def running_server(server_cfg, template: str | None, fields: dict, model: str):
    """The base URL of a server that lists `model`: `template`'s, started here and stopped after, or base_url's."""
    if not template:
        yield str(server_cfg.base_url).rstrip("/")
        return
    port = server_cfg.port or free_port()
    args = command_args(template, {**fields, "port": port})
    base_url = f"http://127.0.0.1:{port}/v1"
    log = Path(tempfile.mkstemp(prefix="nlistral-server-", suffix=".log")[1])
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
        except OSError as err:
            log.unlink()
            raise ConfigError(f"eval.server command {args[0]!r} could not start: {err}") from None
    ok = False
    try:
        print(f"server: started `{shlex.join(args)}` (pid {proc.pid}, log {log}); waiting for {model!r}")
        deadline = time.monotonic() + server_cfg.ready_timeout_s
        while not _lists(base_url, model):
            if proc.poll() is not None:
                raise ConfigError(f"the eval.server command exited with code {proc.returncode} before serving "
                                  f"{model!r} at {base_url}; last lines of {log}:\n{_tail(log)}")  # fmt: skip
            if time.monotonic() > deadline:
                raise ConfigError(f"the eval.server command did not list {model!r} at {base_url}/models within "
                                  f"eval.server.ready_timeout_s={server_cfg.ready_timeout_s}; last lines of {log}:\n"
                                  f"{_tail(log)}")  # fmt: skip
            time.sleep(0.5)
        yield base_url
        ok = True
    finally:
        stop(proc)
        if ok:
            log.unlink(missing_ok=True)
