"""Offline stand-in for the teacher and reflector LLMs: a deterministic word-overlap heuristic.

It lets the whole DAG run with no API key and no network. Its labels are a crude baseline, not a model:
- a hypothesis word that negates (not, no, never, ...) on one side only -> no entailment;
- a number in the hypothesis that the premise does not contain -> no entailment;
- otherwise entailment if at least OVERLAP_THRESHOLD of the hypothesis's content words occur in the premise.
The rationale cites the words it compared, in the same 3-step shape the real teacher is asked for. It reads
the premise and hypothesis back from the prompt's "Premise: ..." / "Hypothesis: ..." lines (see prompts.py), and
as reflector also the "True label: ..." line, arguing for that label from the same cues.
"""

import json
import re

from nlistral.llm.base import Reply, Tally
from nlistral.prompts import read_pair_text

OVERLAP_THRESHOLD = 0.75

NEGATIONS = {"not", "no", "never", "nobody", "nothing", "none", "neither", "nor", "nowhere", "without"}
NUMBER_WORDS = {
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "twenty",
    "hundred", "dozen",
}  # fmt: skip
STOPWORDS = {
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "of", "in", "on", "at", "to", "for",
    "with", "by", "from", "and", "or", "but", "as", "it", "its", "this", "that", "these", "those", "there", "their",
    "his", "her", "he", "she", "they", "them", "some", "has", "have", "had", "do", "does", "did", "into", "onto",
    "while", "up", "down", "out", "over", "near", "next", "very", "just",
}  # fmt: skip


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("n't", " not"))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _content(words: list[str]) -> list[str]:
    seen = []
    for word in words:
        if word not in STOPWORDS and word not in NEGATIONS and word not in seen:
            seen.append(word)
    return seen


def _numbers(words: list[str]) -> set[str]:
    return {w for w in words if w.isdigit() or w in NUMBER_WORDS}


def analyse(premise: str, hypothesis: str) -> dict:
    """The cues the heuristic uses, and its label."""
    p_words, h_words = _words(premise), _words(hypothesis)
    p_stems = {_stem(w) for w in p_words}
    h_content = _content(h_words)
    shared = [w for w in h_content if _stem(w) in p_stems]
    missing = [w for w in h_content if _stem(w) not in p_stems]
    negation = (NEGATIONS & set(h_words)) ^ (NEGATIONS & set(p_words))
    new_numbers = sorted(_numbers(h_words) - _numbers(p_words))
    overlap = len(shared) / len(h_content) if h_content else 1.0
    label = int(not negation and not new_numbers and overlap >= OVERLAP_THRESHOLD)
    return {
        "premise_content": _content(p_words),
        "shared": shared,
        "missing": missing,
        "negation": sorted(negation),
        "new_numbers": new_numbers,
        "overlap": overlap,
        "label": label,
    }


def _quote(words) -> str:
    return ", ".join(f"'{w}'" for w in words) if words else "none"


def rationale(cues: dict, label: int) -> str:
    step1 = f"Step 1: The premise is about {_quote(cues['premise_content'][:8])}."
    step2 = (
        f"Step 2: Of the hypothesis's content words, {len(cues['shared'])} of "
        f"{len(cues['shared']) + len(cues['missing'])} appear in the premise ({_quote(cues['shared'])}); "
        f"not in the premise: {_quote(cues['missing'])}."
    )
    if cues["negation"]:
        step2 += f" Negation on one side only: {_quote(cues['negation'])}."
    if cues["new_numbers"]:
        step2 += f" The hypothesis states numbers the premise does not: {_quote(cues['new_numbers'])}."
    if label == 1:
        step3 = "Step 3: The hypothesis restates what the premise says, so it is entailed."
    else:
        step3 = "Step 3: The hypothesis adds or contradicts information, so it is not entailed."
    return f"{step1} {step2} {step3}"


def _reflect(cues: dict, true_label: int) -> dict:
    if true_label == 1:
        analysis = (
            f"The initial reasoning treated the unmatched words {_quote(cues['missing'])} as new information, "
            "but they only restate or generalise what the premise describes."
        )
    else:
        analysis = (
            f"The initial reasoning relied on the shared words {_quote(cues['shared'])}, but sharing words does not "
            f"establish the hypothesis: {_quote(cues['missing'])} add details the premise does not support."
        )
    return {"error_analysis": analysis, "improved_thought_process": rationale(cues, true_label)}


class OfflineClient:
    """The free stand-in: it computes every answer (nothing is cached, nothing is sent over a network)."""

    def __init__(self) -> None:
        self.tally = Tally()  # each answer counts as a (free) request

    def chat(self, messages: list[dict], sample: int = 0) -> Reply:
        """Deterministic: every self-consistency sample gets the same answer."""
        self.tally.add("requests")
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        cues = analyse(*read_pair_text(prompt))
        reflecting = re.search(r"\nTrue label: ([01])$", prompt)
        if reflecting:
            true_label = int(reflecting.group(1))
            answer = {**_reflect(cues, true_label), "predicted_label": true_label}
        else:
            answer = {"thought_process": rationale(cues, cues["label"]), "predicted_label": cues["label"]}
        text = json.dumps(answer)
        prompt_tokens = sum(len(m["content"]) // 4 for m in messages)
        return Reply(text, "stop", prompt_tokens=prompt_tokens, completion_tokens=len(text) // 4)

    def is_cached(self, messages: list[dict], sample: int = 0) -> bool:
        return False

    def cached_completion_tokens(self) -> tuple[float, int]:
        return 0.0, 0

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass
