"""A model server the evaluate stages run themselves (`eval.server.command`, e.g. `vllm serve ...`).

`running_server` refuses an `eval.server.port` that something already listens on (whatever answers there is not
our server: exit 2), starts the command in its own process group with its output in a log file, waits until GET
/v1/models lists the model while the command is still running (bounded by `eval.server.ready_timeout_s`; an early
exit or the timeout is a ConfigError with the log's last lines: exit 2), yields the base URL, and stops the whole
group when the block ends, however it ends (success, error, Ctrl-C): SIGTERM, then SIGKILL after STOP_GRACE_S. A
watchdog process does the same if the stage dies without a chance to (`kill -9`, OOM killer): it holds the read end
of a pipe only the stage writes to, and stops the group when that pipe closes unannounced. Without a command it
yields `eval.server.base_url`, a server someone else runs. Loopback requests never go through a proxy
(llm/urls.py's `session_for`).
"""

import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from nlistral.errors import ConfigError
from nlistral.llm.urls import session_for

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


def check_port_free(port: int) -> None:
    """ConfigError if something listens on 127.0.0.1:`port`: our server could not bind, and the other one would
    answer in its place (its replies cached under our model's key)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no listener
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise ConfigError(
                f"eval.server.port={port} is already in use ({err.strerror}): another server listens there and would "
                "answer in place of ours; stop it, or set eval.server.port to a free port (null picks one)"
            ) from None


def _tail(log: Path) -> str:
    with open(log, encoding="utf-8", errors="replace") as handle:
        return "".join(deque(handle, LOG_TAIL_LINES)).rstrip()


def _lists(session: requests.Session, base_url: str, model: str) -> bool:
    try:
        resp = session.get(f"{base_url}/models", timeout=5)
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


def watchdog(fd: int, pgid: int) -> None:
    """Wait for the stage's end of pipe `fd` to close: with a byte written first the stage stopped the server itself;
    without one the stage died, so stop process group `pgid` as `stop` would."""
    select.select([fd], [], [])
    if os.read(fd, 1):
        return
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # ProcessLookupError once the whole group is gone
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)


def start_watchdog(pgid: int) -> tuple[int, subprocess.Popen]:
    """A process, in a session of its own (a signal to the stage's group leaves it), that stops group `pgid` when the
    stage dies; returns the pipe's write end, which only this process holds (os.pipe's ends are not inherited), and
    the watchdog."""
    read, write = os.pipe()
    code = f"from nlistral.serving import watchdog; watchdog({read}, {pgid})"
    dog = subprocess.Popen([sys.executable, "-c", code], pass_fds=(read,), stdin=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    os.close(read)
    return write, dog


@contextmanager
def running_server(server_cfg, template: str | None, fields: dict, model: str):
    """The base URL of a server that lists `model`: `template`'s, started here and stopped after, or base_url's."""
    if not template:
        yield str(server_cfg.base_url).rstrip("/")
        return
    if server_cfg.port:
        check_port_free(server_cfg.port)
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
    guard, dog = start_watchdog(proc.pid)
    session = session_for(base_url)
    try:
        print(f"server: started `{shlex.join(args)}` (pid {proc.pid}, log {log}); waiting for {model!r}")
        deadline = time.monotonic() + server_cfg.ready_timeout_s
        while not (_lists(session, base_url, model) and proc.poll() is None):  # only our own server counts
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
        session.close()
        stop(proc)
        os.write(guard, b"x")  # the watchdog may go: the group is stopped
        os.close(guard)
        dog.wait()
        if ok:
            log.unlink(missing_ok=True)
