"""The Trainer the `train` stage runs (nlistral.stages.train): TRL's SFTTrainer on the fine-tuning rows, LoRA on the
base model (4-bit for QLoRA), training arguments from `train.*`. No MLflow here: the stage adds its logging, and
bench/gpu.py builds this same trainer on a bare GPU machine.

Each row is a two-turn chat (user: prompt, assistant: completion) rendered by the tokenizer's chat template, so any
chat model trains with no code change (Mistral's template gives `<s>[INST] {prompt} [/INST] {completion}</s>`).
TRL's SFTTrainer masks the prompt tokens out of the loss. Nothing is truncated (max_length=None): rows over
model.max_seq_length tokens reach here only if the sft stage kept them.

`train.padding_free` (auto|true|false): a batch's rows concatenated into one row with their own position_ids, no
padding (TRL's `padding_free`). It is only correct where the attention keeps the rows apart: transformers 5.24's
masking_utils builds a block-diagonal causal mask from position_ids for sdpa and eager when no attention mask is
passed and no cache is used (TRL's compute_loss sets use_cache=False), and the flash-attention kernels read the
collator's cu_seq_lens. tests/test_padding_free.py proves the losses and gradients equal the padded batch's for sdpa
and eager; auto turns it on for those implementations only.
"""

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import EarlyStoppingCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from nlistral import paths
from nlistral.errors import ConfigError, StageError
from nlistral.io import read_jsonl
from nlistral.model import fsdp_launch, load_base_model, load_tokenizer
from nlistral.paths import FINETUNE

# Attention implementations that keep padding-free rows apart (see the module doc); auto turns padding-free on for these
ISOLATING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def sft_dataset(path) -> Dataset:
    """Conversational prompt/completion rows: TRL renders them with the chat template, loss on the completion."""
    rows = read_jsonl(path)
    if not rows:
        raise StageError(f"{path} has no rows to train on")
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]}
                              for r in rows])  # fmt: skip


def warmup(train) -> float | int:
    """`warmup_ratio` (a fraction of the steps) or `warmup_steps` (a count), never both."""
    if train.warmup_ratio is not None and train.warmup_steps is not None:
        raise ConfigError(
            f"train.warmup_ratio ({train.warmup_ratio}) and train.warmup_steps ({train.warmup_steps}) are both set: "
            "set the one you mean and the other to null"
        )
    if train.warmup_steps is not None:
        return int(train.warmup_steps)
    ratio = float(train.warmup_ratio or 0.0)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {ratio}")
    return ratio  # transformers 5: a float in [0, 1) is a ratio of the steps


def check_precision(cfg, fsdp: bool) -> None:
    """What the GPU run would only find out after the model loaded, refused before any work (exit 2)."""
    if cfg.model.dtype == "float16" and cfg.model.load_in_4bit:
        # TRL casts a quantized model's LoRA weights to bfloat16 whatever the arguments say
        # (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16")
        raise ConfigError("model.dtype=float16: QLoRA trains in bfloat16 (a card with bf16, Ampere or newer) or "
                          "float32 (T4, V100, RTX 20xx: model.dtype=float32)")  # fmt: skip
    if fsdp and "8bit" in cfg.train.optim:
        # FSDP's flat parameters do not fit bitsandbytes' 8-bit optimizer state (bitsandbytes #89, accelerate #1362)
        raise ConfigError(f"train.optim={cfg.train.optim}: an 8-bit optimizer does not work with FSDP; "
                          "use train.optim=adamw_torch (docs/training.md)")  # fmt: skip
    if fsdp and cfg.model.load_in_4bit and cfg.model.bnb_4bit_quant_storage != cfg.model.dtype:
        # FSDP flattens each wrapped layer's 4-bit weights with its norms into one tensor of one float dtype
        # (torch/distributed/fsdp/_flat_param.py: "Cannot flatten integer dtype tensors", "... uniform dtype")
        storage = cfg.model.bnb_4bit_quant_storage
        raise ConfigError(f"model.bnb_4bit_quant_storage={storage}: FSDP shards 4-bit weights stored in model.dtype "
                          f"only; set model.bnb_4bit_quant_storage={cfg.model.dtype}")  # fmt: skip


def training_args(cfg, output_dir) -> SFTConfig:
    train = cfg.train
    if train.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume must be 'auto' or 'never', got {train.resume!r}")
    fsdp = fsdp_launch()
    check_precision(cfg, fsdp)
    try:
        return SFTConfig(
            output_dir=str(output_dir),
            max_length=None,  # never truncate
            completion_only_loss=True,
            num_train_epochs=train.num_epochs,
            max_steps=train.max_steps,
            per_device_train_batch_size=train.per_device_batch_size,
            per_device_eval_batch_size=train.per_device_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate,
            warmup_steps=warmup(train),
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            lr_scheduler_type=train.lr_scheduler_type,
            optim=train.optim,
            # under FSDP its own wrapper checkpoints (fsdp_activation_checkpointing): the Trainer's would all-gather
            # every layer a second time in the backward pass (transformers #30404)
            activation_checkpointing=train.gradient_checkpointing and not fsdp,
            bf16=cfg.model.dtype == "bfloat16",
            logging_steps=train.logging_steps,
            include_num_input_tokens_seen="non_padding",  # -> train_tokens_per_second in every log
            eval_strategy="steps",
            eval_steps=train.eval_steps,
            save_strategy="steps",
            save_steps=train.save_steps,
            save_total_limit=train.save_total_limit,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            restore_callback_states_from_checkpoint=True,  # early stopping's patience counter resumes too
            dataloader_pin_memory=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),  # several CPU processes (accelerate launch) then use gloo
            ddp_find_unused_parameters=False,
            seed=train.seed,
            report_to="none",  # MLflow is logged by MlflowCurves: the Trainer's callback would end our run early
        )
    except ValueError as err:  # e.g. save_steps not a multiple of eval_steps
        raise ConfigError(f"train: {err}") from err


class EvaluateAtEnd(TrainerCallback):
    """Evaluate and save at the last step too, so the tail of training can be the best checkpoint."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = control.should_save = True
        return control


def build_trainer(cfg, output_dir) -> SFTTrainer:
    """The trainer with its tokenized datasets (`trainer.train_dataset`: input_ids, labels with -100 on the prompt)."""
    train = cfg.train
    args = training_args(cfg, output_dir)
    one_gpu_per_process(args)  # before SFTTrainer(), which refuses n_gpu > 1
    lora = LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=list(train.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    # bad input fails before a 7B model loads
    train_rows, dev_rows = (sft_dataset(paths.require(FINETUNE, split)) for split in ("train", "dev"))
    model = load_base_model(cfg, for_training=True)
    args.padding_free = use_padding_free(train.padding_free, model)
    callbacks = [EvaluateAtEnd()]
    if train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=dev_rows,
        processing_class=load_tokenizer(),
        peft_config=lora,
        callbacks=callbacks,
    )


def use_padding_free(setting, model) -> bool:
    """`train.padding_free`: true/false as set; auto = on where the model's attention isolates packed rows."""
    attention = model.config._attn_implementation
    if setting == "auto":
        return attention in ISOLATING_ATTENTION
    if setting is True and attention not in ISOLATING_ATTENTION:
        raise ConfigError(
            f"train.padding_free=true needs an attention that keeps packed rows apart "
            f"({', '.join(ISOLATING_ATTENTION)}), the model uses {attention!r}: set train.padding_free to auto or false"
        )
    return bool(setting)


class TokenCount(TrainerCallback):
    """Positions and real tokens of the training batches (tokens_processed, pad_token_share in metrics/train.json).

    It wraps the trainer's collator until training starts: train() builds its dataloader (taking the collator) before
    on_train_begin, where the plain collator is put back, so the dev evaluations' dataloaders, built later, are not
    counted. Counts this process's batches of this session (a resumed run: from its checkpoint on); the dataloader
    runs in-process (dataloader_num_workers=0, the default), where these counters live.
    """

    def __init__(self, trainer):
        self.trainer, self.collator = trainer, trainer.data_collator
        self.positions = self.tokens = 0
        trainer.data_collator = self
        trainer.add_callback(self)

    def __call__(self, examples):
        batch = self.collator(examples)
        self.positions += batch["input_ids"].numel()
        self.tokens += sum(len(example["input_ids"]) for example in examples)
        return batch

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.data_collator = self.collator

    def metrics(self) -> dict:
        return {
            "padding_free": self.trainer.args.padding_free,
            "tokens_processed": self.tokens,
            "positions_processed": self.positions,
            "pad_token_share": round(1 - self.tokens / self.positions, 4) if self.positions else None,
        }


def one_gpu_per_process(args) -> None:
    """A process trains on its own GPU only. In one process on a host with N GPUs TrainingArguments counts all of them
    (`_n_gpu = torch.cuda.device_count()`), and TRL's SFTTrainer.__init__ then raises "does not support
    nn.DataParallel"; the Trainer would also count them into the batch (per_device x N). Several GPUs are used through
    `accelerate launch` (a process each). transformers does the same (`_n_gpu = 1`) for a model it places across
    GPUs itself. Must run before SFTTrainer() is built."""
    if args.n_gpu > 1:
        args._n_gpu = 1
