"""A real HTTP server on 127.0.0.1 speaking Mistral's (and OpenAI's) chat JSON, for the tests and the benchmark.

- POST /v1/chat/completions answers `reply(body)` (a content string, or {"content", "finish_reason"}; default: the
  offline stand-in's answer) after `latency` seconds. `faults`, a list consumed one per chat request in order,
  injects trouble first: {"status": 429, "headers": {...}}, {"status": 500}, {"hang": seconds} (then answers),
  {"reset": True} (TCP reset, no answer), {"body": "<html>"} (200, not JSON), {"content": ..., "finish_reason": ...}.
- `rate`: at most that many chat requests in any 1 s window; beyond it a 429 (Retry-After: 1), as providers do.
- GET /v1/models lists `models`. With `api_key` set, any other bearer key gets 401 everywhere.
- The Batch API: POST /v1/files, POST /v1/batch/jobs, GET /v1/batch/jobs/{id} (the job runs at its `batch_polls`-th
  poll; the first `batch_line_errors` lines fail), GET /v1/files/{id}/content. `batch_faults` {route: [status, ...]}
  answers those routes (files, jobs, poll, download) with the listed statuses first, one per request.
- `echo_auth`: error bodies (injected statuses, failed batch lines) echo the request's Authorization header, as a
  careless proxy might, so the key-leak tests can catch a key that is passed on.
- `counts` counts requests by route (chat, models, files, jobs, poll, download, batch_lines); `chat_bodies`,
  `arrivals`, `admitted`, `uploads` and `auth` keep what arrived and when; `billed` keeps the `usage` of every
  answer it gave (chat replies and batch lines): what a provider would bill.
"""

import json
import socket
import struct
import threading
import time
import uuid
from collections import Counter, deque
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nlistral.llm.offline import OfflineClient


def offline_reply(body: dict) -> str:
    return OfflineClient().chat(body["messages"]).text


def completion(body: dict, content: str, finish_reason: str = "stop") -> dict:
    prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
    completion_tokens = len(content) // 4
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that time out or get reset are expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    llm = None  # the LLMServer, set per server

    def do_GET(self):
        self.llm.handle(self)

    do_POST = do_GET

    def log_message(self, *args):
        pass


class LLMServer:
    def __init__(self, reply=offline_reply, *, api_key=None, models=("test-model",), latency=0.0, rate=None,
                 batch_polls=1):  # fmt: skip
        self.reply = reply
        self.api_key = api_key
        self.models = list(models)
        self.latency = latency
        self.rate = rate
        self.batch_polls = batch_polls
        self.batch_line_errors = 0
        self.batch_faults = {}
        self.batch_ascii = True  # False: result files hold UTF-8 as it is (U+2028 unescaped), as JSON allows
        self.echo_auth = False
        self.faults = []
        self.counts = Counter()
        self.chat_bodies = []
        self.arrivals = []  # time.monotonic() of each chat request
        self.admitted = []  # ... of each one the rate limit let through
        self.auth = []
        self.billed = []
        self.files = {}
        self.uploads = []  # the (purpose, content) of each POST /v1/files
        self.jobs = {}
        self._arrivals = deque()
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"llm": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- routing -------------------------------------------------------------------------------------------------
    def handle(self, h):
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        parts = h.path.split("?")[0].strip("/").split("/")[1:]  # after "v1"
        route = {
            ("GET", "models"): "models", ("POST", "chat"): "chat", ("POST", "files"): "files",
            ("POST", "batch"): "jobs" if len(parts) == 2 else None, ("GET", "batch"): "poll",
            ("GET", "files"): "download",
        }.get((h.command, parts[0] if parts else ""))  # fmt: skip
        with self._lock:
            self.counts[route] += 1
            self.auth.append(h.headers.get("Authorization"))
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _send(h, 401, {"message": "Unauthorized", "request_id": uuid.uuid4().hex})
        with self._lock:
            status = self.batch_faults[route].pop(0) if self.batch_faults.get(route) else None
        if status:
            return _send(h, status, self._error(h, f"injected {status}"))
        if route == "models":
            return _send(h, 200, {"object": "list", "data": [{"id": m, "object": "model", "aliases": []}
                                                             for m in self.models]})  # fmt: skip
        if route == "chat":
            return self._chat(h, json.loads(raw))
        if route == "files":
            return self._upload(h, raw)
        if route == "jobs":
            return self._create_job(h, json.loads(raw))
        if route == "poll":
            return self._poll(h, parts[2])
        if route == "download" and parts[-1] == "content" and parts[1] in self.files:
            return _send(h, 200, self.files[parts[1]])
        return _send(h, 404, {"message": "Not Found"})

    # --- chat ----------------------------------------------------------------------------------------------------
    def _chat(self, h, body):
        with self._lock:
            self.chat_bodies.append(body)
            self.arrivals.append(time.monotonic())
            fault = self.faults.pop(0) if self.faults else {}
            limited = self.rate is not None and self._over_rate()
            if not limited:
                self.admitted.append(self.arrivals[-1])
        if limited:
            return _send(h, 429, {"object": "error", "message": "Requests rate limit exceeded", "type": "rate_limited",
                                  "code": "1300"}, {"Retry-After": "1"})  # fmt: skip
        if "status" in fault:
            return _send(h, fault["status"], self._error(h, f"injected {fault['status']}"), fault.get("headers"))
        if fault.get("reset"):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return None
        if "body" in fault:
            return _send(h, 200, fault["body"].encode(), content_type="text/html")
        time.sleep(fault.get("hang", 0) + self.latency)
        answer = fault.get("content") or self.reply(body)
        if isinstance(answer, str):
            answer = {"content": answer}
        finish = fault.get("finish_reason") or answer.get("finish_reason", "stop")
        payload = completion(body, answer["content"], finish)
        with self._lock:
            self.billed.append(payload["usage"])
        return _send(h, 200, payload)

    def _error(self, h, message: str) -> dict:
        return {"message": message, **({"authorization": h.headers.get("Authorization")} if self.echo_auth else {})}

    def _over_rate(self) -> bool:
        now = time.monotonic()
        while self._arrivals and self._arrivals[0] <= now - 1.0:
            self._arrivals.popleft()
        if len(self._arrivals) >= self.rate:
            return True
        self._arrivals.append(now)
        return False

    # --- batch ---------------------------------------------------------------------------------------------------
    def _upload(self, h, raw):
        head = f"Content-Type: {h.headers['Content-Type']}\r\n\r\n".encode()
        form = BytesParser(policy=policy.default).parsebytes(head + raw)
        fields = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                  for p in form.iter_parts()}  # fmt: skip
        file_id = str(uuid.uuid4())
        with self._lock:
            self.files[file_id] = fields["file"]
            self.uploads.append((fields["purpose"].decode(), fields["file"]))
        return _send(h, 200, {"id": file_id, "object": "file", "bytes": len(fields["file"]),
                              "purpose": fields["purpose"].decode(), "filename": "requests.jsonl"})  # fmt: skip

    def _create_job(self, h, body):
        lines = [json.loads(x) for x in self.files[body["input_files"][0]].decode().splitlines() if x.strip()]
        job = {
            "id": str(uuid.uuid4()), "object": "batch", "input_files": body["input_files"], "model": body["model"],
            "endpoint": body["endpoint"], "metadata": body.get("metadata"), "status": "QUEUED",
            "total_requests": len(lines), "completed_requests": 0, "succeeded_requests": 0, "failed_requests": 0,
            "output_file": None, "error_file": None, "created_at": int(time.time()),
        }  # fmt: skip
        line_error = self._error(h, "injected line error")  # what a failed line reports
        with self._lock:
            self.jobs[job["id"]] = {"job": job, "lines": lines, "polls": 0, "line_error": line_error}
        return _send(h, 200, job)

    def _poll(self, h, job_id):
        with self._lock:
            state = self.jobs.get(job_id)
            if state is None:
                return _send(h, 404, {"message": "No batch job"})
            state["polls"] += 1
            job = state["job"]
            if job["status"] in ("QUEUED", "RUNNING"):
                job["status"] = "RUNNING"
                if state["polls"] >= self.batch_polls:
                    self._run_job(state)
        return _send(h, 200, job)

    def _run_job(self, state):
        job, out, err = state["job"], [], []
        for line in state["lines"]:
            body = {**line["body"], "model": job["model"]}
            self.counts["batch_lines"] += 1
            if self.batch_line_errors:
                self.batch_line_errors -= 1
                err.append({"custom_id": line["custom_id"], "error": state["line_error"],
                            "response": {"status_code": 500, "body": {"message": "injected"}}})  # fmt: skip
                continue
            answer = self.reply(body)
            content = answer if isinstance(answer, str) else answer["content"]
            response = {"status_code": 200, "body": completion(body, content)}
            self.billed.append(response["body"]["usage"])
            out.append({"id": uuid.uuid4().hex, "custom_id": line["custom_id"], "response": response, "error": None})
        for name, records in (("output_file", out), ("error_file", err)):
            if records:
                file_id = str(uuid.uuid4())
                self.files[file_id] = "".join(json.dumps(r, ensure_ascii=self.batch_ascii) + "\n"
                                              for r in records).encode()  # fmt: skip
                job[name] = file_id
        job.update(status="SUCCESS", completed_requests=len(out) + len(err), succeeded_requests=len(out),
                   failed_requests=len(err))  # fmt: skip


def _send(h, status, payload, headers=None, content_type="application/json"):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(data)


# --- helpers for the tests -------------------------------------------------------------------------------------------
KEY = "sk-test-5ec4e7-never-print-me"

ROWS = [
    ("A man is playing a guitar on stage.", "A man is performing music.", 1),
    ("Two dogs run through a snowy field.", "The dogs are asleep in a kennel.", 0),
    ("A woman reads a book in the park.", "A woman reads a book.", 1),
    ("Kids play soccer at school.", "Three kids play soccer.", 0),
]


def many_rows(n: int) -> list[tuple]:
    return [(f"Runner {i} crosses the finish line first.", f"Runner {i} finishes the race.", 1) for i in range(n)]


def write_split(root, rows, split="train") -> None:
    """data/{split}.csv under `root` with the given (premise, hypothesis, label) rows."""
    import csv

    (root / "data").mkdir(exist_ok=True)
    with open(root / "data" / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["premise", "hypothesis", "label"])
        writer.writerows(rows)


def stage_overrides(role: str, url: str, backend: str = "mistral", **settings) -> list[str]:
    """`nlistral` overrides pointing `role` (teacher/reflector) at a loopback server, with test-sized timings."""
    base = {"base_url": url, "model": "test-model", "requests_per_second": 0, "tokens_per_minute": 0,
            "backoff_base_s": 0.01, "timeout_s": 30, "max_concurrency": 1, "batch_poll_s": 0.01}  # fmt: skip
    return [f"{role}={backend}", "data.dir=data"] + [f"{role}.{k}={v}" for k, v in {**base, **settings}.items()]
