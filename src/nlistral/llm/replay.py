"""Replay backend: answer each request from a recorded outputs file instead of a model. Free, no network.

`replay_from` names a file or a folder of files (every *.json / *.jsonl in it): JSON arrays or JSON Lines of the
study's stage outputs (`*_thoughts.json`, `*_reflections.json`) or of ours (`{split}_thoughts.jsonl`,
`{split}_reflections.jsonl`). A request is matched by the premise and hypothesis in its prompt:
- a teacher prompt gets the recorded `thought_process` and `predicted_label`;
- a reflector prompt (it carries the true label) gets the recorded `error_analysis`, `improved_thought_process` and
  the reflection's own label (`reflected_label` in our files, `predicted_label` in the study's).
The stages check a replayed answer like any other, so a recorded reflection that never reached the true label is
asked again, gets the same answer and stays unresolved. A pair with no recorded answer fails with `not_recorded`.
Nothing is sent: `requests` stays 0, tokens and cost are 0. Replayed answers are not written to the reply cache:
the recording is their store, and a `dvc update` of it must not be shadowed by old answers.
"""

import json
import logging
from pathlib import Path

from nlistral.data import DataError
from nlistral.llm.base import Reply, RequestFailed, Tally
from nlistral.paths import MissingInput
from nlistral.prompts import read_pair_text

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl")


def read_records(path: Path) -> list[tuple[int | None, dict]]:
    """(line, record) pairs from a JSON Lines file, (None, record) from a JSON array; DataError if malformed."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err.msg})", err.lineno) from None
        if not isinstance(records, list):
            raise DataError(path, "expected a JSON array of records")
        numbered: list[tuple[int | None, dict]] = [(None, record) for record in records]
    else:
        numbered = []
        for number, raw in enumerate(text.split("\n"), 1):  # splitlines would also break at U+2028 / U+0085
            if raw.strip():
                try:
                    numbered.append((number, json.loads(raw)))
                except json.JSONDecodeError as err:
                    raise DataError(path, f"not a JSON object per line ({err.msg})", number) from None
    for index, (line, record) in enumerate(numbered):
        if not isinstance(record, dict):
            raise DataError(path, f"record {index}: expected a JSON object, got {type(record).__name__}", line)
    return numbered


def recorded_answers(record: dict) -> tuple[str, dict] | None:
    """('reflection' | 'thought', the answer as the model would have sent it), or None for a record without one
    (e.g. a `*_failed.jsonl` row)."""
    if "improved_thought_process" in record:
        label = record["reflected_label"] if "reflected_label" in record else record.get("predicted_label")
        return "reflection", {
            "error_analysis": record.get("error_analysis"),
            "improved_thought_process": record["improved_thought_process"],
            "predicted_label": label,
        }
    if "thought_process" in record and "predicted_label" in record:
        return "thought", {"thought_process": record["thought_process"], "predicted_label": record["predicted_label"]}
    return None


class ReplayClient:
    def __init__(self, cfg):
        source = Path(str(cfg.replay_from))
        if not source.exists():
            raise MissingInput(f"{source} not found: replay_from names no recording (the study's: import them as in "
                               "docs/data.md, 'Start from the study's data')")  # fmt: skip
        files = sorted(p for p in source.iterdir() if p.suffix in SUFFIXES) if source.is_dir() else [source]
        self.source = source
        self.tally = Tally()  # replayed answers are not requests: the engine reports `requests: 0`
        self.answers: dict[str, dict[tuple[str, str], dict]] = {"thought": {}, "reflection": {}}
        conflicts = 0
        for path in files:
            for index, (line, record) in enumerate(read_records(path)):
                found = recorded_answers(record)
                if found is None:
                    continue
                for field in ("premise", "hypothesis"):
                    if not isinstance(record.get(field), str):
                        raise DataError(path, f"record {index}: no text {field!r}", line)
                kind, answer = found
                key = (record["premise"], record["hypothesis"])
                first = self.answers[kind].setdefault(key, answer)
                conflicts += first != answer
        if conflicts:
            log.warning("%s: %d pairs are recorded more than once with different answers; the first is replayed "
                        "(files in name order)", source, conflicts)  # fmt: skip
        log.info("%s: %d recorded thoughts, %d recorded reflections", source, len(self.answers["thought"]),
                 len(self.answers["reflection"]))  # fmt: skip

    def chat(self, messages: list[dict], sample: int = 0) -> Reply:
        """The recorded answer; a recording holds one answer per pair, so every self-consistency sample replays it."""
        prompt = next(m["content"] for m in messages if m["role"] == "user")  # the first user turn: the row
        kind = "reflection" if "\nTrue label: " in prompt else "thought"
        answer = self.answers[kind].get(read_pair_text(prompt))
        if answer is None:
            self.tally.add("not_recorded")
            raise RequestFailed("not_recorded", f"no recorded {kind} for this premise and hypothesis in {self.source}")
        self.tally.add("replayed")
        return Reply(json.dumps(answer, ensure_ascii=False), "stop")

    def is_cached(self, messages: list[dict], sample: int = 0) -> bool:
        """Always: the recording is the store; a pair it lacks fails unsent (`not_recorded`)."""
        return True

    def cached_completion_tokens(self) -> tuple[float, int]:
        return 0.0, 0  # a recording holds no token counts

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass
