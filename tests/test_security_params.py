"""Credentials anywhere in the config never reach MLflow's params.yaml artifact (issue 31, item 7).

Bug this catches, seen failing on main: `redacted_params` cleaned only teacher/reflector.base_url (and dropped their
port), so eval.server.base_url=http://bob:TOKEN@..., mlflow.tracking_uri=https://carol:PASS@... and an `--api-key` in
eval.server.command were logged verbatim.
"""

import yaml
from omegaconf import OmegaConf

from nlistral.config import load_config
from nlistral.stages.train import redacted_params

SECRETS = ("TOKEN1", "PASS2", "KEY3", "KEY4", "TOKEN5", "TOKEN6")


def test_every_credential_in_the_config_is_removed_and_hosts_keep_their_port(workdir):
    cfg = load_config([
        "teacher=openai", "teacher.base_url=https://alice:TOKEN1@llm.example:8443/v1",
        "mlflow.tracking_uri=https://carol:PASS2@mlflow.example:5000",
        "eval.server.base_url=http://bob:KEY3@vllm.lan:8000/v1",
        "eval.server.command='vllm serve {base} --api-key KEY4 --port {port}'",
        "eval.server.base_command='vllm serve {base} --hf-token=TOKEN5'",
        "+data.source_url='https://hub.example/data.csv?token=TOKEN6&x=1'",
    ])  # fmt: skip
    text = redacted_params(cfg)
    assert not [s for s in SECRETS if s in text]
    params = yaml.safe_load(text)
    assert params["teacher"]["base_url"] == "https://llm.example:8443/v1"
    assert params["eval"]["server"]["base_url"] == "http://vllm.lan:8000/v1"
    assert params["mlflow"]["tracking_uri"] == "https://mlflow.example:5000"
    assert params["eval"]["server"]["command"] == "vllm serve {base} --api-key *** --port {port}"
    assert params["data"]["source_url"] == "https://hub.example/data.csv?token=***&x=1"
    assert params["model"] == OmegaConf.to_container(cfg.model, resolve=True)  # the rest as it was
