"""Model text -> validated fields, or a reasoned failure with a corrective message.

Used for LLM replies in stages 1-2 (the feedback becomes the reprompt) and for the fine-tuned
model's generations in `evaluate` (an unparseable output is a parse failure, never a label).
"""

import json
import re

THOUGHT_FIELDS = ("thought_process",)
REFLECTION_FIELDS = ("error_analysis", "improved_thought_process")

_LABELS = {0: 0, 1: 1, "0": 0, "1": 1, "true": 1, "false": 0}  # True == 1 and False == 0 as keys


class ReplyError(ValueError):
    """A reply that cannot be accepted. `reason` is a short stable code for counting."""

    def __init__(self, reason: str, feedback: str):
        super().__init__(f"{reason}: {feedback}")
        self.reason = reason
        self.feedback = feedback


def _json_objects(text: str):
    """Yield every JSON object embedded in `text` (code fences, prose around it), in order."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


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
    if finish_reason in ("length", "model_length"):
        raise ReplyError("truncated", "Your reply was cut off by the length limit. Answer again, more concisely.")
    objects = [o for o in _json_objects(text or "") if any(k in o for k in (*fields, "predicted_label"))]
    if not objects:
        keys = ", ".join(f'"{f}"' for f in (*fields, "predicted_label"))
        raise ReplyError("no_json", f"Your reply held no JSON object. Answer with one JSON object with keys {keys}.")
    obj = objects[0]
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
    return parsed
