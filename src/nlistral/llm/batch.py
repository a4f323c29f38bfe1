"""Mistral's Batch API (`mode: batch`, half price): each round of requests goes out as one batch job.

A round takes the next request of every unfinished conversation; those the reply cache cannot answer are uploaded
as JSONL (POST /files, purpose=batch), run as one job (POST /batch/jobs), polled with backoff (GET
/batch/jobs/{id}) and downloaded (GET /files/{output_file}/content) into the cache. Then each conversation takes its
reply and finishes or needs a reprompt, which goes out in the next round. The job id is stored in the cache under a
hash of the round's request set, so a re-run after a crash resumes that job instead of paying for a second one; a
stored job the API no longer knows (404 or another refusal) is forgotten and a new one started. A request that a job
leaves unanswered is asked again in the next round, up to `max_retries` rounds.

With a budget (`budget_usd`), a round sends only the requests whose worst case still fits (in order); the others
fail their rows with reason `budget`, unsent. The job's replies are then billed at their `usage`.

If the Batch API itself fails (an upload, a poll or a download still failing after `max_retries` retries), the
round's uncached requests fail their rows with reason `batch_<cause>` (e.g. `batch_server_error`), so the stage
writes what it has and fails like any stage with too many failed rows. The job id stays stored: a re-run resumes
the job, paying nothing twice.
"""

import hashlib
import json
import logging
import time
from dataclasses import replace

from nlistral.llm.base import RequestFailed
from nlistral.llm.budget import Budget
from nlistral.llm.cache import ReplyCache
from nlistral.llm.http import HttpClient, parse_completion

log = logging.getLogger(__name__)

TERMINAL = ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED")
POLL_MAX_S = 60.0


class BatchTransport:
    """The engine's `mode: batch`: rounds of batch jobs through `client`, the stage's HttpClient (the Client whose
    tally, stop and close the engine uses), sharing its reply cache and budget."""

    def __init__(self, cfg, cache_dir, budget: Budget | None = None):
        self.cache = ReplyCache(cache_dir)
        self.budget = budget
        self.client = HttpClient(cfg, self.cache, budget)
        self.max_rounds = cfg.max_retries  # rounds a request may go unanswered before its row fails
        self.poll_s = cfg.batch_poll_s

    def run_rounds(self, conversations, accounts) -> None:
        client, cache = self.client, self.cache
        while active := [conv for conv in conversations if not conv.done]:
            bodies = [(conv, client.body(conv.messages, conv.task.sample)) for conv in active]
            asks = [(conv, body, client.key(body)) for conv, body in bodies]
            missing = {key: body for _, body, key in asks if cache.get(key) is None}
            held, unpaid = _reserve(self.budget, missing)
            fetched, errors, broken = self._round(missing, held, accounts)
            for conv, _, key in asks:
                if key in unpaid:
                    conv.fail(unpaid[key])
                    accounts.row_done(conv)
                elif (raw := cache.get(key)) is None:
                    conv.failed_rounds += 1
                    if broken or conv.failed_rounds > self.max_rounds:
                        missed = errors.get(key, "no result in the job's output")
                        conv.fail(broken or RequestFailed("batch_failed", missed))
                        accounts.row_done(conv)
                else:
                    reply = replace(parse_completion(raw), cached=key not in fetched)
                    fetched.discard(key)  # a second row asking the same thing re-uses it
                    accounts.reply(reply)
                    conv.feed(reply)
                    if conv.done:
                        accounts.row_done(conv)

    def _round(self, missing: dict, held: float, accounts) -> tuple[set, dict, RequestFailed | None]:
        """One job for the `missing` requests -> (keys fetched, errors, the Batch API's failure if it failed)."""
        fetched: set = set()
        errors: dict = {}
        broken = None
        try:
            if missing:
                fetched, errors = self._run_job(missing, accounts)
        except RequestFailed as err:
            log.warning("the Batch API failed (%s); this round's %d requests fail their rows", err, len(missing))
            broken = RequestFailed(f"batch_{err.reason}", err.detail)
        finally:
            if held and self.budget:  # the replies fetched are billed at their usage; a failed job keeps its worst case
                billed = sum(_cost(self.budget, self.cache.get(key)) for key in fetched)
                self.budget.settle(held, billed if broken is None else held)
        return fetched, errors, broken

    def _run_job(self, requests: dict, accounts) -> tuple[set, dict]:
        """Run (or resume) the job for `requests` {cache key: body}; store its replies. -> (keys fetched, errors)."""
        client = self.client
        request_set = hashlib.sha256(json.dumps([client.base_url, client.model, sorted(requests)]).encode()).hexdigest()
        client.tally.add("batch_rounds")
        job = self._resume(request_set) or self._start(request_set, requests)
        client.tally.add("requests", len(requests))  # one request line each, created or resumed by this run
        delay = self.poll_s
        while job.get("status") not in TERMINAL:
            done, total = job.get("completed_requests", 0), job.get("total_requests", len(requests))
            accounts.bar.set_postfix_str(f"batch job {job['id']}: {job.get('status')} {done}/{total}")
            time.sleep(delay)
            delay = min(POLL_MAX_S, delay * 2)
            job = client.send("GET", f"/batch/jobs/{job['id']}", parse=_object)
        if job["status"] != "SUCCESS":
            log.warning("batch job %s ended %s; unanswered requests go into the next round", job["id"], job["status"])
        fetched, errors = self._collect(job, requests)
        self.cache.set_batch_job(request_set, None)  # its replies are in the cache now
        return fetched, errors

    def _resume(self, request_set: str) -> dict | None:
        """The stored job of this request set, if the API still knows it."""
        if not (job_id := self.cache.batch_job(request_set)):
            return None
        try:
            job = self.client.send("GET", f"/batch/jobs/{job_id}", parse=_object)
        except RequestFailed as err:
            if not _refused(err):
                raise
            log.warning("stored batch job %s is gone (%s); starting a new job", job_id, err.reason)
            self.cache.set_batch_job(request_set, None)
            return None
        log.info("resuming batch job %s (%s)", job_id, job["status"])
        return job

    def _start(self, request_set: str, requests: dict) -> dict:
        """Upload `requests` and create their job; its id is stored at once (a re-run resumes it)."""
        client = self.client
        lines = "".join(
            json.dumps({"custom_id": key, "body": {k: v for k, v in body.items() if k != "model"}}, ensure_ascii=False)
            + "\n"
            for key, body in requests.items()
        )
        upload = client.send(
            "POST", "/files", parse=_object, data={"purpose": "batch"},
            files={"file": ("requests.jsonl", lines.encode(), "application/jsonl")},
        )  # fmt: skip
        job = client.send(
            "POST", "/batch/jobs", parse=_object,
            json={"input_files": [upload["id"]], "model": client.model, "endpoint": "/v1/chat/completions",
                  "metadata": {"nlistral_request_set": request_set[:16]}},
        )  # fmt: skip
        self.cache.set_batch_job(request_set, job["id"])
        client.tally.add("batch_jobs")
        return job

    def _collect(self, job: dict, requests: dict) -> tuple[set, dict]:
        """Store the replies in the job's output and error files -> (keys fetched, {key: why it has no reply})."""
        fetched: set[str] = set()
        errors: dict[str, str] = {}
        for record in self._lines(job.get("output_file")) + self._lines(job.get("error_file")):
            key, response = record.get("custom_id"), record.get("response") or {}
            body = response.get("body", response)
            if not isinstance(key, str) or key not in requests or key in fetched:
                continue
            try:
                if response.get("status_code", 200) != 200 or record.get("error"):
                    raise ValueError(f"status {response.get('status_code')}: {record.get('error') or body}")
                raw = json.dumps(body, ensure_ascii=False)
                parse_completion(raw)
            except ValueError as err:
                errors[key] = self.client.mask(str(err))[:300]  # masked before cutting: no partial key survives
                continue
            self.cache.put(key, json.dumps(requests[key], ensure_ascii=False), raw)
            fetched.add(key)
        return fetched, errors

    def _lines(self, file_id) -> list[dict]:
        """The records of a job's output or error file; none if the file is gone (its requests go into the next
        round)."""
        if not file_id:
            return []
        try:
            text = self.client.send("GET", f"/files/{file_id}/content", parse=lambda r: (r.text, 0), capped=False)
        except RequestFailed as err:
            if not _refused(err):
                raise
            log.warning("batch file %s is gone (%s)", file_id, err.reason)
            return []
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a cut-off line: its request goes into the next round
                continue
        return [r for r in records if isinstance(r, dict)]


def _reserve(budget: Budget | None, missing: dict) -> tuple[float, dict]:
    """Reserve the worst case of the requests that fit the budget, in order; take the others out of `missing`.

    -> (the amount held, {key: RequestFailed('budget')} of those not sent).
    """
    if budget is None or not missing:
        return 0.0, {}
    held, unpaid = 0.0, {}
    for key, body in list(missing.items()):
        try:
            held += budget.reserve(budget.worst(body["messages"], body["max_tokens"]), wait=False) or 0.0
        except RequestFailed as err:
            unpaid[key] = err
            del missing[key]
    return held, unpaid


def _cost(budget: Budget, raw: str | None) -> float:
    reply = parse_completion(raw) if raw else None
    return budget.cost(reply.prompt_tokens, reply.completion_tokens) if reply else 0.0


def _refused(err: RequestFailed) -> bool:
    """The server refused the request (4xx): asking again will not help."""
    return err.reason.startswith("http_")


def _object(resp):
    """A file or job object; one without an id is a bad response (retried)."""
    data = resp.json()
    if not isinstance(data, dict) or "id" not in data:
        raise ValueError("no id")
    return data, 0
