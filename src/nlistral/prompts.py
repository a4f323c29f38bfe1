"""Every prompt NLIstral sends or trains on, in one place.

Editing a prompt re-runs the stages that use it (prompts.py is their DVC dependency) and misses the LLM reply
cache (its keys cover the messages), so old and new replies never mix. Teacher and reflector prompts carry a
"Premise: ...\nHypothesis: ..." block (pair_text), which the offline backend reads back (see llm/offline.py).
"""

import json
import re

STEP_SHAPE = (
    "Step 1: <what the premise states>. "
    "Step 2: <how the hypothesis relates to it: shared facts, added details, contradictions>. "
    "Step 3: <conclusion: entailed or not>."
)

TEACHER_SYSTEM = f"""You are an expert in natural language inference. Given a premise and a hypothesis, reason step by step about whether the hypothesis can be logically inferred from the premise.

Answer with a single JSON object and nothing else:
{{"thought_process": "{STEP_SHAPE}", "predicted_label": <1 if the premise entails the hypothesis, else 0>}}

Rules:
- Reason before you answer, grounded only in the premise and common sense.
- Keep the three steps short.
- predicted_label is the number 0 or 1."""

REFLECTOR_SYSTEM = f"""You are an expert in natural language inference who reviews another model's reasoning. You receive a premise, a hypothesis, the model's reasoning, its predicted label, and the true label. Explain what went wrong and write a corrected reasoning that reaches the true label by sound argument.

Answer with a single JSON object and nothing else:
{{"error_analysis": "<what the initial reasoning got wrong>", "improved_thought_process": "{STEP_SHAPE}", "predicted_label": <the label your improved reasoning reaches: 0 or 1>}}

Rules:
- The improved reasoning must stand on its own: do not mention the true label or the initial answer.
- Keep it as concise as the initial reasoning.
- predicted_label is the number 0 or 1."""

STUDENT_INSTRUCTION = (
    "Use chain of thought reasoning to determine if the hypothesis is entailed by the premise. "
    "Give your reasoning and the final label (1 = entailment, 0 = no entailment) as JSON: "
    '{"thought_process": "...", "predicted_label": 0 or 1}'
)
# The student's tasks (sft.format picks which it trains on; docs/experiments.md: Did the rationales help). Each
# instruction says which answer is expected, and the completion holds exactly those keys in that order. `label` and `rationale` carry
# Distilling step-by-step's task prefixes (Hsieh et al. 2023), so a multitask model tells its two tasks apart.
STUDENT_INSTRUCTIONS = {
    "cot": STUDENT_INSTRUCTION,
    "label_first": (
        "Determine if the hypothesis is entailed by the premise. Give the label first (1 = entailment, "
        '0 = no entailment), then your reasoning, as JSON: {"predicted_label": 0 or 1, "thought_process": "..."}'
    ),
    "label": (
        "[label] Determine if the hypothesis is entailed by the premise. Give only the label (1 = entailment, "
        '0 = no entailment) as JSON: {"predicted_label": 0 or 1}'
    ),
    "rationale": (
        "[rationale] Explain step by step whether the hypothesis is entailed by the premise, as JSON: "
        '{"thought_process": "..."}'
    ),
}
COMPLETION_KEYS = {
    "cot": ("thought_process", "predicted_label"),
    "label_first": ("predicted_label", "thought_process"),
    "label": ("predicted_label",),
    "rationale": ("thought_process",),
}
# sft.format -> (the tasks each example is trained on, the task evaluation asks)
FORMATS = {
    "cot": (("cot",), "cot"),
    "label_first": (("label_first",), "label_first"),
    "label_only": (("label",), "label"),
    "multitask": (("label", "rationale"), "label"),
}


def pair_text(premise: str, hypothesis: str) -> str:
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def read_pair_text(prompt: str) -> tuple[str, str]:
    """Premise and hypothesis back from a teacher or reflector prompt (either may span several lines)."""
    match = re.search(r"Premise: (.*?)\nHypothesis: (.*?)(?:\nInitial reasoning: |\Z)", prompt, re.DOTALL)
    if not match:
        raise ValueError("the prompt has no 'Premise: ...\nHypothesis: ...' block")
    return match.group(1), match.group(2)


def teacher_messages(premise: str, hypothesis: str) -> list[dict]:
    return [
        {"role": "system", "content": TEACHER_SYSTEM},
        {"role": "user", "content": pair_text(premise, hypothesis)},
    ]


def reflector_messages(
    premise: str, hypothesis: str, thought_process: str, predicted_label: int, true_label: int
) -> list[dict]:
    user = (
        f"{pair_text(premise, hypothesis)}\n"
        f"Initial reasoning: {thought_process}\n"
        f"Initial predicted label: {predicted_label}\n"
        f"True label: {true_label}"
    )
    return [
        {"role": "system", "content": REFLECTOR_SYSTEM},
        {"role": "user", "content": user},
    ]


def student_prompt(premise: str, hypothesis: str, task: str = "cot") -> str:
    """The instruction the fine-tuned model sees for `task`, in training and in evaluation alike."""
    return f"{pair_text(premise, hypothesis)}\n\n{STUDENT_INSTRUCTIONS[task]}"


def completion_json(thought_process: str | None, label: int, task: str = "cot") -> str:
    """The answer `task` expects: COMPLETION_KEYS[task], in that order."""
    values = {"thought_process": thought_process, "predicted_label": int(label)}
    return json.dumps({key: values[key] for key in COMPLETION_KEYS[task]}, ensure_ascii=False)


def check_format(name: str) -> tuple[tuple[str, ...], str]:
    """(training tasks, evaluation task) of sft.format `name`; ValueError naming the choices otherwise."""
    if name not in FORMATS:
        raise ValueError(f"sft.format={name!r}: choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def student_chat_prompt(tokenizer, prompt: str) -> str:
    """What the student model sees before it answers: `prompt` as the user turn of the tokenizer's chat template,
    with the generation prompt (Mistral: `<s>[INST] {prompt} [/INST]`; ChatML: `...<|im_start|>assistant\n`).

    The text already holds the template's special tokens: tokenize it with `add_special_tokens=False`.
    """
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def inst_prompt(prompt: str) -> str:
    """Mistral instruction format without BOS: the tokenizer adds `<s>`, training appends `</s>`."""
    return f"[INST] {prompt} [/INST]"


def sft_text(prompt: str, completion: str) -> str:
    """The row as one Mistral-format string (`text` in the fine-tuning JSONL, for readers and other tools): one BOS,
    one EOS. Training does not read it: TRL renders `prompt`/`completion` through the tokenizer's chat template, which
    for the Mistral format gives exactly this string (tests/test_model_stages.py checks the two agree)."""
    return f"<s>{inst_prompt(prompt)} {completion}</s>"


def label_mismatch_feedback(label: int, true_label: int) -> str:
    return (
        f"Your improved reasoning concludes with predicted_label {label}, but the true label is {true_label}. "
        "Re-examine the premise and hypothesis and answer again in the same JSON format, with an improved "
        f"thought_process whose argument actually reaches predicted_label {true_label}."
    )
