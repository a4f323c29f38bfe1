"""NLIstral: chain-of-thought NLI data with LLMs, QLoRA fine-tuning of Mistral-7B."""

import logging
import warnings

__version__ = "0.1.0"

# Warnings a user can do nothing about, silenced where they start (a clean run prints none):
# - bitsandbytes' CPU backend logs at import that it could not fetch a faster kernel from the Hugging Face hub and
#   advises `pip install kernels`, which downloads code at run time; its own kernel is used and is what we test.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# - transformers deprecates `is_gradient_checkpointing`, which the pinned peft and trl still read during training.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
