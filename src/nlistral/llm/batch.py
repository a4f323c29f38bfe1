"""Mistral's Batch API (`mode: batch`, half price): each round of requests goes out as one batch job.

A round takes the next request of every unfinished conversation; those the reply cache cannot answer are uploaded
as JSONL (POST /files, purpose=batch), run as one job (POST /batch/jobs), polled with backoff (GET
/batch/jobs/{id}) and downloaded (GET /files/{output_file}/content) into the cache. Then each conversation takes its
reply and finishes or needs a reprompt, which goes out in the next round. The job id is stored in the cache under a
hash of the round's request set, so a re-run after a crash resumes that job instead of paying for a second one. A
request that a job leaves unanswered is asked again in the next round, up to `max_retries` rounds.
"""

import hashlib
import json
import logging
import time
from dataclasses import replace

from nlistral.llm import RequestFailed
from nlistral.llm.http import parse_completion

log = logging.getLogger(__name__)

TERMINAL = ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED")
POLL_MAX_S = 60.0


def run_rounds(client, conversations, accounts, poll_s: float) -> None:
    cache = client.cache
    while active := [conv for conv in conversations if not conv.done]:
        asks = [(conv, client.body(conv.messages)) for conv in active]
        asks = [(conv, body, client.key(body)) for conv, body in asks]
        missing = {key: body for _, body, key in asks if cache.get(key) is None}
        fetched, errors = _run_job(client, missing, accounts, poll_s) if missing else (set(), {})
        for conv, _, key in asks:
            raw = cache.get(key)
            if raw is None:
                conv.failed_rounds += 1
                if conv.failed_rounds > client.max_retries:
                    conv.fail(RequestFailed("batch_failed", errors.get(key, "no result in the job's output")))
                    accounts.row_done(conv)
                continue
            reply = replace(parse_completion(raw), cached=key not in fetched)
            fetched.discard(key)  # a second row asking the same thing re-uses it
            accounts.reply(reply)
            conv.feed(reply)
            if conv.done:
                accounts.row_done(conv)


def _run_job(client, requests: dict, accounts, poll_s: float) -> tuple[set, dict]:
    """Run (or resume) the job for `requests` {cache key: body}; store its replies. -> (keys fetched, errors)."""
    cache = client.cache
    request_set = hashlib.sha256(json.dumps([client.base_url, client.model, sorted(requests)]).encode()).hexdigest()
    client.ensure_ready()
    client.tally.add("batch_rounds")
    job = None
    if job_id := cache.batch_job(request_set):
        job = client.request("GET", f"/batch/jobs/{job_id}", parse=_json)
        log.info("resuming batch job %s (%s)", job_id, job["status"])
    if job is None:
        lines = "".join(
            json.dumps({"custom_id": key, "body": {k: v for k, v in body.items() if k != "model"}}, ensure_ascii=False)
            + "\n"
            for key, body in requests.items()
        )
        upload = client.request(
            "POST", "/files", parse=_json, data={"purpose": "batch"},
            files={"file": ("requests.jsonl", lines.encode(), "application/jsonl")},
        )  # fmt: skip
        job = client.request(
            "POST", "/batch/jobs", parse=_json,
            json={"input_files": [upload["id"]], "model": client.model, "endpoint": "/v1/chat/completions",
                  "metadata": {"nlistral_request_set": request_set[:16]}},
        )  # fmt: skip
        cache.set_batch_job(request_set, job["id"])
        client.tally.add("batch_jobs")
    delay = poll_s
    while job["status"] not in TERMINAL:
        done, total = job.get("completed_requests", 0), job.get("total_requests", len(requests))
        accounts.bar.set_postfix_str(f"batch job {job['id']}: {job['status']} {done}/{total}")
        time.sleep(delay)
        delay = min(POLL_MAX_S, delay * 2)
        job = client.request("GET", f"/batch/jobs/{job['id']}", parse=_json)
    if job["status"] != "SUCCESS":
        log.warning("batch job %s ended %s; unanswered requests go into the next round", job["id"], job["status"])
    fetched, errors = set(), {}
    for record in _lines(client, job.get("output_file")) + _lines(client, job.get("error_file")):
        key, response = record.get("custom_id"), record.get("response") or {}
        body = response.get("body", response)
        if key not in requests or key in fetched:
            continue
        try:
            if response.get("status_code", 200) != 200 or record.get("error"):
                raise ValueError(f"status {response.get('status_code')}: {record.get('error') or body}")
            raw = json.dumps(body, ensure_ascii=False)
            parse_completion(raw)
        except ValueError as err:
            errors[key] = str(err)[:300]
            continue
        cache.put(key, json.dumps(requests[key], ensure_ascii=False), raw)
        fetched.add(key)
    cache.set_batch_job(request_set, None)  # its replies are in the cache now
    return fetched, errors


def _json(resp):
    return resp.json(), 0


def _lines(client, file_id) -> list[dict]:
    if not file_id:
        return []
    text = client.request("GET", f"/files/{file_id}/content", parse=lambda r: (r.text, 0))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
