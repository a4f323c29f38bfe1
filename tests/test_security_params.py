"""Credentials anywhere in the config never reach MLflow's params.yaml artifact (issue 31, item 7).

Bug this catches, seen failing on main: `redacted_params` cleaned only teacher/reflector.base_url (and dropped their
port), so eval.server.base_url=http://bob:TOKEN@..., mlflow.tracking_uri=https://carol:PASS@... and an `--api-key` in
eval.server.command were logged verbatim. Then (seen failing): a secret variable before a command (`HF_TOKEN=...
vllm serve`), a bearer token, a password holding `@` (its end survived), and MLflow's params (flat_params: the data
and model sections, e.g. a dataset URL's ?token=) were not redacted at all.
"""

import pytest
import yaml
from omegaconf import OmegaConf

from nlistral.config import load_config
from nlistral.stages.train import flat_params, redacted_params

SECRETS = ("TOKEN1", "PASS2", "KEY3", "KEY4", "TOKEN5", "TOKEN6", "TOKEN7", "TOKEN8", "SS9")


def test_every_credential_in_the_config_is_removed_and_hosts_keep_their_port(workdir):
    cfg = load_config([
        "teacher=openai", "teacher.base_url=https://alice:TOKEN1@llm.example:8443/v1",
        "mlflow.tracking_uri=https://carol:PASS2@mlflow.example:5000",
        "eval.server.base_url=http://bob:KEY3@vllm.lan:8000/v1",
        "eval.server.command='vllm serve {base} --api-key KEY4 --port {port}'",
        "eval.server.base_command='vllm serve {base} --hf-token=TOKEN5'",
        "+data.source_url='https://hub.example/data.csv?token=TOKEN6&x=1'",
        "+eval.server.wrapper='HF_TOKEN=TOKEN7 vllm serve {base}'",
        "+eval.server.headers='Authorization: Bearer TOKEN8'",
        "+data.mirror='https://erin:PA@SS9@mirror.example/d'",
    ])  # fmt: skip
    text = redacted_params(cfg)
    assert not [s for s in SECRETS if s in text]
    assert not [s for s in SECRETS if s in str(flat_params(cfg))]  # MLflow's params: data and model sections
    params = yaml.safe_load(text)
    assert params["teacher"]["base_url"] == "https://llm.example:8443/v1"
    assert params["eval"]["server"]["base_url"] == "http://vllm.lan:8000/v1"
    assert params["mlflow"]["tracking_uri"] == "https://mlflow.example:5000"
    assert params["eval"]["server"]["command"] == "vllm serve {base} --api-key *** --port {port}"
    assert params["data"]["source_url"] == "https://hub.example/data.csv?token=***&x=1"
    assert params["model"] == OmegaConf.to_container(cfg.model, resolve=True)  # the rest as it was


def test_the_tracking_stores_credentials_are_not_in_its_errors(workdir):
    """On main an unreachable mlflow.tracking_uri=https://user:PASS@host was a ConfigError quoting the URL whole."""
    import socket

    from nlistral import tracking
    from nlistral.errors import ConfigError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed below: nothing listens there
    cfg = load_config([f"mlflow.tracking_uri=http://carol:PASS-1@127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match=f"MLflow tracking server http://127.0.0.1:{port} does not answer") as err:
        tracking.connect(cfg)
    assert "PASS-1" not in str(err.value)
