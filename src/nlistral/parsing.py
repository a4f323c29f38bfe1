"""Model text -> validated fields, or a reasoned failure with a corrective message.

Used for LLM replies in stages 1-2 (the feedback becomes the reprompt) and for the generations scored by the
evaluate stages (`read_answer`: an unparseable output is a parse failure, never a label).

How a reply was read is named (`Answer.method`): `json` (the reply is one JSON object), `fenced_json` (the
object sits in a Markdown code fence), `embedded_json` (the object sits in prose), or, for evaluation only,
`label_key` (no valid JSON object, but a literal `"predicted_label": 0|1` key, e.g. in JSON broken by an
unescaped quote inside the reasoning). A label in prose alone ("the answer is 1") is never read.

For the tasks whose answer starts with the label (prompts.COMPLETION_KEYS: `label_first`, `label`) evaluation stops
generating once the label is readable, so their reader wants the label alone, and names `label_prefix` an output
that is the start of the answer object (`{"predicted_label": 1,`), however it was cut.
"""

import json
import re
from dataclasses import dataclass

THOUGHT_FIELDS = ("thought_process",)
REFLECTION_FIELDS = ("error_analysis", "improved_thought_process")

_LABELS = {0: 0, 1: 1, "0": 0, "1": 1, "true": 1, "false": 0}  # True == 1 and False == 0 as keys
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n(.*?)```", re.DOTALL)
_LABEL_KEY = re.compile(r'"predicted_label"\s*:\s*"?\s*([01])(?![\d.])')
_LABEL_PREFIX = re.compile(r'\s*\{\s*"predicted_label"\s*:\s*"?\s*([01])(?![\d.])')
LABEL_FIRST_TASKS = ("label_first", "label")


class ReplyError(ValueError):
    """A reply that cannot be accepted. `reason` is a short stable code for counting."""

    def __init__(self, reason: str, feedback: str):
        super().__init__(f"{reason}: {feedback}")
        self.reason = reason
        self.feedback = feedback


def _json_objects(text: str):
    """Yield (start, end, object) for every JSON object embedded in `text` (code fences, prose around it)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield match.start(), end, value


def _method(text: str, start: int, end: int) -> str:
    """How the object at text[start:end] was found: the whole reply, inside a code fence, or inside prose."""
    if not text[:start].strip() and not text[end:].strip():
        return "json"
    if any(fence.start(1) <= start and end <= fence.end(1) for fence in _FENCE.finditer(text)):
        return "fenced_json"
    return "embedded_json"


def parse_label(value) -> int:
    """0/1, "0"/"1", 0.0/1.0 and true/false are labels; anything else (0.5, "maybe") is not."""
    if isinstance(value, float) and value in (0.0, 1.0):
        value = int(value)
    if isinstance(value, str):
        value = value.strip().lower()
    try:
        return _LABELS[value]
    except (KeyError, TypeError):
        raise ReplyError(
            "bad_label",
            f"predicted_label was {json.dumps(value)}; it must be the number 0 (no entailment) or 1 (entailment).",
        ) from None


def parse_reply(text: str, fields=THOUGHT_FIELDS, finish_reason: str | None = None) -> dict:
    """Return `{field: str, ..., "predicted_label": 0|1}` from a reply, or raise ReplyError.

    The text of each field is kept exactly as the model wrote it.
    """
    return _read(text, fields, finish_reason)[0]


def _read(text: str, fields, finish_reason: str | None) -> tuple[dict, str]:
    """(parsed fields, method) or ReplyError; see parse_reply."""
    if finish_reason in ("length", "model_length"):
        raise ReplyError("truncated", "Your reply was cut off by the length limit. Answer again, more concisely.")
    text = text or ""
    found = [(s, e, o) for s, e, o in _json_objects(text) if any(k in o for k in (*fields, "predicted_label"))]
    if not found:
        keys = ", ".join(f'"{f}"' for f in (*fields, "predicted_label"))
        raise ReplyError("no_json", f"Your reply held no JSON object. Answer with one JSON object with keys {keys}.")
    start, end, obj = found[0]
    parsed = {}
    for field in fields:
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            problem = "was missing" if field not in obj else "was empty or not a string"
            raise ReplyError(
                f"missing_{field}",
                f'The key "{field}" {problem}; it must hold your reasoning as a non-empty string.',
            )
        parsed[field] = value
    if "predicted_label" not in obj:
        raise ReplyError(
            "missing_predicted_label",
            'The key "predicted_label" was missing; it must be the number 0 (no entailment) or 1 (entailment).',
        )
    parsed["predicted_label"] = parse_label(obj["predicted_label"])
    return parsed, _method(text, start, end)


@dataclass(frozen=True)
class Answer:
    """A scored generation: a label and how it was read, or no label and why (`error`, a ReplyError reason)."""

    label: int | None
    method: str | None
    error: str | None
    thought_process: str | None = None


def read_answer(text: str, finish_reason: str | None, task: str = "cot") -> Answer:
    """The evaluation parser: parse_reply's rules for a thought, plus the `label_key` fallback (module doc); for a
    label-first `task`, the label alone, or `label_prefix`.

    A reply cut off by the length limit is a failure even when it holds a label: it did not finish its answer
    (unless the label comes first: then it is the answer).
    """
    if task in LABEL_FIRST_TASKS:
        try:
            parsed, method = _read(text, (), None)
        except ReplyError as err:
            if match := _LABEL_PREFIX.match(text or ""):
                return Answer(int(match.group(1)), "label_prefix", None)
            return Answer(None, None, "truncated" if finish_reason in ("length", "model_length") else err.reason)
        return Answer(parsed["predicted_label"], method, None)
    try:
        parsed, method = _read(text, THOUGHT_FIELDS, finish_reason)
    except ReplyError as err:
        match = _LABEL_KEY.search(text or "") if err.reason == "no_json" else None
        if match is None:
            return Answer(None, None, err.reason)
        return Answer(int(match.group(1)), "label_key", None)
    return Answer(parsed["predicted_label"], method, None, parsed["thought_process"])
