"""NLIstral: chain-of-thought NLI data with LLMs, QLoRA fine-tuning of Mistral-7B."""

__version__ = "0.1.0"
