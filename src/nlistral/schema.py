"""The types, ranges and choices of conf/'s values, checked before a stage touches data, a model or the network.

`check(cfg)` runs on every config a stage or `nlistral params` reads (config.load_config, cli params), so a wrong
value fails in a second with one line naming the key, the value and what is allowed (exit 2), never as a torch or
peft traceback after the model has loaded. Strict types: YAML's `2e-4` (a string to PyYAML) or `batch_size=abc`
is refused, not coerced. Keys the schema does not know pass unchecked (`+key=value` adds them); a key left out
(`~key`) is not required here.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nlistral.errors import ConfigError

Positive = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]  # 0 allowed: retries, reprompts, patience
Rate = Annotated[float, Field(ge=0)]  # requests/s, prices, seconds; 0 = none
Seconds = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(min_length=1)]
DType = Literal["float32", "bfloat16", "float16"]
ENGINES = ("hf", "server")  # eval.engine: transformers in-process, or an OpenAI-compatible server
# transformers' SchedulerType values (tests/test_schema.py checks the list against the pinned transformers)
SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
]  # fmt: skip


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Train(Section):
    seed: int = 0
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    num_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=-1)] = -1  # -1: num_epochs decides
    per_device_batch_size: Positive = 1
    gradient_accumulation_steps: Positive = 1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = None
    warmup_steps: Count | None = None
    weight_decay: Rate = 0.0
    max_grad_norm: Rate = 0.0
    lr_scheduler_type: SCHEDULERS = "linear"
    optim: Name = "adamw_torch"
    gradient_checkpointing: bool = False
    padding_free: Literal["auto"] | bool = "auto"
    logging_steps: Positive = 1
    eval_steps: Positive = 1
    early_stopping_patience: Count = 0
    save_steps: Positive = 1
    save_total_limit: Positive | None = None
    resume: Literal["auto", "never"] = "auto"
    lora_r: Positive = 8
    lora_alpha: Positive = 16
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lora_target_modules: Annotated[list[Name], Field(min_length=1)] | Name = "all-linear"

    @model_validator(mode="after")
    def _cadence(self):
        if self.max_steps == 0:
            raise ValueError("max_steps=0: -1 (train for num_epochs) or a number of steps > 0")
        if self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps={self.save_steps}: a multiple of eval_steps ({self.eval_steps})")
        return self


class Tiny(Section):
    vocab_size: Positive = 1
    hidden_size: Positive = 1
    num_layers: Positive = 1
    num_heads: Positive = 1
    num_kv_heads: Positive = 1
    intermediate_size: Positive = 1
    initializer_range: Annotated[float, Field(gt=0)] = 0.02
    seed: int = 0
    chat_format: Literal["mistral", "chatml"] = "mistral"


class Model(Section):
    name: Name = "model"
    license: Name = "unknown"
    build_tiny: bool = False
    name_or_path: Name | None = None
    revision: Name | None = None
    gguf_file: Name | None = None
    dtype: DType = "float32"
    max_seq_length: Positive = 1
    load_in_4bit: bool = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    requires_cuda: bool = False  # no CUDA device visible: the stages that load it stop (exit 2)
    allow_cpu: bool = False  # ... unless this is set
    tiny: Tiny | None = None


class Server(Section):
    base_url: Name | None = None
    model: Name = "adapter"
    base_model_name: Name | None = None
    api_key_env: Name | None = None
    max_concurrency: Positive = 1
    requests_per_second: Rate = 0.0
    timeout_s: Seconds = 1.0
    max_retries: Count = 0
    backoff_base_s: Rate = 0.0
    backoff_max_s: Rate = 0.0
    max_wait_s: Rate = 300.0
    max_failure_rate: Probability = 0.0
    command: Name | None = None
    base_command: Name | None = None
    port: Port | None = None
    ready_timeout_s: Seconds = 1.0


class TestSet(Section):
    path: Name = "set"
    limit: Positive | None = None


class Eval(Section):
    batch_size: Positive = 1
    max_new_tokens: Positive = 1
    label_max_new_tokens: Positive = 1
    allow_short_max_new_tokens: bool = False
    limit: Positive | None = None
    engine: str = "hf"
    scoring: Literal["generate", "likelihood"] = "generate"
    bootstrap: Annotated[int, Field(ge=1000)] = 1000  # fewer resamples: an interval's 2.5th percentile is noise
    seed: int = 0
    teacher_max_reprompts: Count = 0
    server: Server | None = None
    test_sets: dict[str, TestSet] = {}

    @field_validator("engine")
    @classmethod
    def _engine(cls, engine: str) -> str:
        if engine not in ENGINES:
            hint = "; vLLM runs as a server: eval.engine=server (docs/evaluation.md)" if engine == "vllm" else ""
            raise ValueError(f"choose from {', '.join(ENGINES)}{hint}")
        return engine


class LLM(Section):
    """A teacher or reflector: conf/llm/common.yaml and what each backend sets."""

    backend: Literal["offline", "mistral", "openai", "replay"] = "offline"
    mode: Literal["sync", "batch"] = "sync"
    model: Name = "model"
    base_url: Name | None = None
    api_key_env: Name | None = None
    response_format: Literal["json_object"] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    max_tokens: Positive = 1
    seed: int | None = None
    max_retries: Count = 0
    max_wait_s: Rate = 300.0
    max_response_bytes: Positive = 4_000_000
    backoff_base_s: Rate = 0.0
    backoff_max_s: Rate = 0.0
    batch_poll_s: Seconds = 1.0
    max_reprompts: Count = 0
    price_input_per_mtok: Rate = 0.0
    price_output_per_mtok: Rate = 0.0
    max_failure_rate: Probability = 0.0
    budget_usd: Rate | None = None
    n_samples: Positive = 1
    max_attempts: Positive = 1
    max_concurrency: Positive = 1
    requests_per_second: Rate = 0.0
    tokens_per_minute: Count = 0
    timeout_s: Seconds = 1.0
    tokenizer: Literal["approx", "tekken"] = "approx"
    expected_completion_tokens: Positive = 1
    expected_reprompt_rate: Rate = 0.0
    expected_latency_s: Rate = 0.0
    replay_from: Name = "conf/llm/no_recording.jsonl"


Split = Literal["train", "dev", "test"]


class Dataset(Section):
    path: Name = "dataset"
    config: Name | None = None
    revision: Name | None = None
    splits: dict[Split, Name] = {}
    labels: dict[str | int, Literal[-1, 0, 1]] = {}
    sample_size: dict[Split, Positive | None] = {}
    seed: int = 0


class Data(Section):
    name: Name = "data"
    dir: Name = "data"
    prepare: list[Split] = []
    license: Name | None = None
    dataset: Dataset | None = None


class Sft(Section):
    include_reflections: bool = True
    balance_labels: bool = False
    shuffle: bool = True
    seed: int = 0
    drop_too_long: bool = True
    drop_suspect: bool = False
    format: Literal["cot", "label_first", "label_only", "multitask"] = "cot"
    label_rows: Literal["verified", "all"] = "verified"


class Audit(Section):
    min_agreement: Probability = 0.0


class Estimate(Section):
    teacher_error_rate: Probability = 0.0


class Params(Section):
    data: Data | None = None
    teacher: LLM | None = None
    reflector: LLM | None = None
    model: Model | None = None
    train: Train | None = None
    eval: Eval | None = None
    sft: Sft | None = None
    audit: Audit | None = None
    estimate: Estimate | None = None
    llm_cache_dir: Name | None = None


def _allowed(error: dict) -> str:
    """Pydantic's message, less its prefix: "Input should be 'hf' or 'server'" -> "should be 'hf' or 'server'"."""
    message = error["msg"].removeprefix("Value error, ")
    return message.removeprefix("Input ")


def _is_union_tag(part) -> bool:
    """Pydantic's name for a member of a union in an error's location (`list[constrained-str]`), not a key."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))


def check(params: dict[str, Any]) -> None:
    """Raise ConfigError naming the first wrong value in a composed config (a plain dict)."""
    try:
        Params.model_validate(params)
    except ValidationError as err:
        error = err.errors()[0]
        key = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
        if error["type"] == "value_error" and isinstance(error["input"], dict):  # a rule across a section's keys
            raise ConfigError(f"{key}: {_allowed(error)}") from None
        raise ConfigError(f"{key}={error['input']!r}: {_allowed(error)}") from None
