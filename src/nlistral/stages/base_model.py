"""Stage: the base model everything downstream fine-tunes and evaluates, saved to models/base.

`model.build_tiny: true` (embedded profile): build a ~0.6M-parameter Mistral-architecture model with random weights
and a byte-level BPE tokenizer trained on our prompt text + the train split, both deterministic (fixed seed, fixed
corpus order). Its scores mean nothing; it exists so the whole pipeline runs on a laptop, QLoRA path included.
`model.build_tiny: false`: save only the hub tokenizer at the pinned revision; weights stay in the HF cache and
are loaded by name (base_model.json) where needed.
`model.gguf_file` set (a GGUF file in the folder or hub repo `model.name_or_path`): the GGUF's weights, dequantized to
`model.dtype`, and its tokenizer are saved to models/base as a plain checkpoint, which every later stage loads like
the tiny model (in 4-bit for QLoRA: transformers cannot quantize while it reads a GGUF file).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from nlistral import prompts
from nlistral.data import load_split
from nlistral.errors import ConfigError
from nlistral.io import write_json
from nlistral.model import compute_dtype, require_cuda, staged_dir
from nlistral.paths import BASE_DIR, BASE_INFO

# Mistral's [INST] format (matches prompts.sft_text): BOS once, then `[INST] user [/INST] assistant</s>` turns.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)
# ChatML (Qwen and others): no BOS, `<|im_start|>role\ncontent<|im_end|>\n` turns, <|im_end|> ends the answer.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# `model.tiny.chat_format` -> (template, special tokens, whether the tokenizer adds BOS)
CHAT_FORMATS = {
    "mistral": (MISTRAL_TEMPLATE, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
                True),
    "chatml": (CHATML_TEMPLATE, {"unk_token": "<unk>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
                                 "additional_special_tokens": ["<|im_start|>"]}, False),
}  # fmt: skip


def tokenizer_corpus(data_dir) -> list[str]:
    """Every prompt template, a completion in the trained format, and the train split's prompts, in file order."""
    fixed = [
        prompts.TEACHER_SYSTEM,
        prompts.REFLECTOR_SYSTEM,
        prompts.inst_prompt(prompts.STUDENT_INSTRUCTION),
        prompts.completion_json(prompts.STEP_SHAPE, 0),
        prompts.completion_json(prompts.STEP_SHAPE, 1),
    ]
    rows = load_split(data_dir, "train")
    return fixed + [prompts.student_prompt(r.premise, r.hypothesis) for r in rows.itertuples()]


def build_tokenizer(corpus, vocab_size: int, chat_format: str = "mistral") -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown bytes) with the chat format's special tokens in its vocabulary (none added later).

    Like Mistral's (and unlike ChatML models'), the "mistral" tokenizer adds BOS and no EOS when encoding.
    """
    template, special_tokens, adds_bos = CHAT_FORMATS[chat_format]
    specials = [v for k, v in special_tokens.items() if k != "additional_special_tokens"]
    specials += special_tokens.get("additional_special_tokens", [])
    tok = Tokenizer(models.BPE(unk_token=special_tokens["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if adds_bos:
        bos = special_tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
    tokenizer.chat_template = template
    return tokenizer


def build_tiny_model(tiny, tokenizer, max_positions: int) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=tiny.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(tiny.seed)
    return MistralForCausalLM(config)


def with_pad_token(tokenizer):
    """A pad token from the vocabulary (batched generation and training pad), never a new one: the embedding matrix
    keeps its size. Mistral ships no pad and a GGUF may have no `padding_token_id` (transformers then leaves it
    None); <unk> never occurs in text. Without <unk>, EOS: padding is masked out of the loss by position (TRL's
    collator), so the EOS the model must learn still counts."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def run(cfg) -> dict:
    require_cuda(cfg)  # a hub or GGUF 7B base needs a GPU later: say so before anything is fetched or converted
    with staged_dir(BASE_DIR) as out:
        if cfg.model.build_tiny:
            tiny = cfg.model.tiny
            tokenizer = build_tokenizer(tokenizer_corpus(cfg.data.dir), tiny.vocab_size, tiny.chat_format)
            model = build_tiny_model(cfg.model.tiny, tokenizer, max_positions=4 * cfg.model.max_seq_length)
            model.save_pretrained(out)
            info = {"name_or_path": str(BASE_DIR), "revision": None, "built_tiny": True,
                    "parameters": model.num_parameters()}  # fmt: skip
        elif cfg.model.gguf_file:
            folder = Path(cfg.model.name_or_path)
            if folder.is_dir() and not (folder / cfg.model.gguf_file).is_file():
                raise ConfigError(f"model.gguf_file={cfg.model.gguf_file!r}: no such file in "
                                  f"model.name_or_path={str(folder)!r}")  # fmt: skip
            source = {"revision": cfg.model.revision, "gguf_file": cfg.model.gguf_file}
            tokenizer = with_pad_token(AutoTokenizer.from_pretrained(cfg.model.name_or_path, **source))
            model = AutoModelForCausalLM.from_pretrained(  # dequantized whole: a plain, savable checkpoint
                cfg.model.name_or_path, dtype=compute_dtype(cfg), **source,
                quantization_config=GgufConfig(gguf_file=cfg.model.gguf_file, dequantize=True),
            )  # fmt: skip
            model.save_pretrained(out)
            info = {"name_or_path": str(BASE_DIR), "revision": None, "built_tiny": False,
                    "source": {"name_or_path": cfg.model.name_or_path, **source},
                    "parameters": model.num_parameters()}  # fmt: skip
        else:
            hub = AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
            tokenizer = with_pad_token(hub)
            info = {"name_or_path": cfg.model.name_or_path, "revision": cfg.model.revision, "built_tiny": False}
        info["vocab_size"] = len(tokenizer)
        tokenizer.save_pretrained(out)
        write_json(out / BASE_INFO.name, info)
    print(f"base model: {info['name_or_path']} (vocab {info['vocab_size']}) -> {BASE_DIR}")
    return info
