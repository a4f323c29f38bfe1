"""Loading what the `base_model` and `train` stages saved: every stage after them goes through here.

models/base holds the tokenizer and base_model.json, which names where the weights are: models/base itself for the
tiny profile, a hub id + revision (weights in the HF cache) for Mistral-7B. models/adapter holds the LoRA adapter.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from nlistral import paths
from nlistral.errors import ConfigError
from nlistral.paths import ADAPTER_DIR, BASE_DIR


def base_info(base_dir=BASE_DIR) -> dict:
    """{"name_or_path", "revision", ...} as written by the base_model stage."""
    return json.loads((paths.require(base_dir) / paths.BASE_INFO.name).read_text(encoding="utf-8"))


def load_tokenizer(path=BASE_DIR):
    """The tokenizer saved in a local stage output (never looked up on the hub)."""
    return AutoTokenizer.from_pretrained(paths.require(path), local_files_only=True)


def compute_dtype(cfg) -> torch.dtype:
    """`model.dtype` ("float32", "bfloat16"): the weights' dtype, and the 4-bit layers' compute dtype."""
    return getattr(torch, cfg.model.dtype)


def quantization_config(cfg) -> BitsAndBytesConfig | None:
    if not cfg.model.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        bnb_4bit_quant_storage=getattr(torch, cfg.model.bnb_4bit_quant_storage),  # FSDP: the compute dtype
    )


def fsdp_launch() -> bool:
    """Whether `accelerate launch` started this process for FSDP. Only its environment says so before the Trainer
    exists: PartialState never reports FSDP (accelerate/state.py), AcceleratorState does once the Trainer made it;
    accelerate and transformers read the same variable (accelerate/state.py, transformers/distributed/fsdp.py)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def require_cuda(cfg) -> None:
    """`model.requires_cuda` (Mistral-7B): no CUDA device visible (a container started without `--gpus`, a torch
    build newer than the driver) is an error before anything loads, not a 7B model on the CPU. `model.allow_cpu`
    overrides it (bench/gpu.py's tiny shape)."""
    if cfg.model.get("requires_cuda") and not cfg.model.get("allow_cpu") and not torch.cuda.is_available():
        raise ConfigError(f"model.requires_cuda: {cfg.model.name} needs a GPU and no CUDA device is visible "
                          "(torch.cuda.is_available() is False); model.allow_cpu=true runs it on the CPU "
                          "anyway")  # fmt: skip


def device_map(local_process_index: int, cuda: bool) -> dict:
    """The whole model on this process's own GPU (its local index on the machine), or on the CPU without CUDA.

    Every process of `accelerate launch` holds a full copy (DDP): all on GPU 0 would not fit, and accelerate refuses to
    train a 4-bit model placed on another device than the process's own.
    """
    return {"": local_process_index if cuda else "cpu"}


def load_base_model(cfg, for_training=False, base_dir=BASE_DIR):
    """The base weights, 4-bit quantized when `model.load_in_4bit` (QLoRA), prepared for k-bit training if asked.

    Under FSDP the k-bit preparation is skipped: it casts every non-4-bit tensor to float32, and FSDP flattens the
    bfloat16-stored 4-bit weights with them into parameters that must share one dtype.
    """
    require_cuda(cfg)
    from peft import prepare_model_for_kbit_training  # here, not on top: importing peft (+ bitsandbytes) takes ~10 s

    from accelerate import PartialState

    state = PartialState()  # one process, or this one of `accelerate launch`'s
    info = base_info(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        info["name_or_path"],
        revision=info.get("revision"),
        dtype=compute_dtype(cfg),
        quantization_config=quantization_config(cfg),
        device_map=device_map(state.local_process_index, torch.cuda.is_available()),
    )
    if for_training and cfg.model.load_in_4bit and not fsdp_launch():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model


def load_adapter_model(cfg, adapter_dir=ADAPTER_DIR, base_dir=BASE_DIR):
    """Base + trained LoRA adapter, in eval mode."""
    from peft import PeftModel  # see load_base_model

    model = PeftModel.from_pretrained(load_base_model(cfg, base_dir=base_dir), paths.require(adapter_dir))
    return model.eval()


@contextmanager
def staged_dir(dest):
    """Yield an empty directory beside `dest` that replaces `dest` when the block succeeds: no half-written outs."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
