"""Credentials out of what is printed, logged or stored (MLflow's params, the model server's command line and log).

`redacted(text)`: `text` with every credential a config string may hold replaced by *** (or, in a URL's userinfo,
removed). `flag_secrets(words)`: the values a command passes in its secret flags, to mask wherever the command's own
output repeats them (vLLM logs its args, `--api-key` included).
"""

import re

# What may hold a credential anywhere in a config string: a URL's user:pass@ (up to its last @: a password may hold
# one), a secret query parameter, a command's secret flag (`vllm serve ... --api-key KEY`), a secret variable set
# before a command (`HF_TOKEN=... vllm serve`), a bearer token (`Authorization: Bearer ...`).
URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
SECRET_QUERY = re.compile(r"([?&](?:api[-_]?key|access[-_]?token|token|key|password|secret|sig)=)[^&#\s]+", re.I)
SECRET_FLAG = re.compile(r"(--(?:api[-_]key|hf[-_]token|token|password|secret)(?:=|\s+))(\S+)", re.I)
SECRET_VARIABLE = re.compile(r"((?:^|(?<=\s))[A-Z_][A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD)[A-Z0-9_]*=)\S+")
BEARER = re.compile(r"(\b(?:Bearer|Basic|Token)\s+)[^\s'\"]+", re.I)


def redacted(text: str) -> str:
    text = URL_USERINFO.sub(r"\1", text)  # the host and port stay: they say where the run talked to
    for pattern in (SECRET_QUERY, SECRET_FLAG, SECRET_VARIABLE, BEARER):
        text = pattern.sub(r"\1***", text)
    return text


def flag_secrets(words: list[str]) -> list[str]:
    """The values of `words`' secret flags (`--api-key KEY`, `--hf-token=TOKEN`)."""
    return [m.group(2) for m in SECRET_FLAG.finditer(" ".join(words))]
