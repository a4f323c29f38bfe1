"""MLflow for `train` and `evaluate`: which store, the run's name and provenance, and writes that never fail a stage.

- The store: `mlflow.tracking_uri`, a relative `sqlite:///` path made absolute (see `resolve_uri`). Its first use
  creates and migrates the schema, and `set_experiment` creates the experiment: both race when parallel stages
  (`dvc queue start -j 2`) meet a fresh store (`duplicate column name: step`), so `connect` does them under a
  cross-process file lock beside the SQLite file. An HTTP server that does not answer stops the stage (ConfigError,
  exit 2) before any model is loaded.
- The run: named after its DVC experiment (`DVC_EXP_NAME`), else `train <short commit>`; tagged with the git commit,
  dirty state and experiment name. The training run is also tagged with its adapter's content digest
  (`ADAPTER_TAG`): `evaluate` finds it by that tag, on any machine that shares the store and has the adapter (from
  the DVC remote), so nothing run-specific has to live in the adapter folder, which stays the same on every run.
- Writes: SQLite waits for a busy store (MLflow sets busy_timeout 20 s); a write that still fails is retried a few
  times, then the run stops logging for the rest of the stage and the stage ends with a warning saying what MLflow
  missed. Hours of training are never lost to a tracking server that went away: the metrics files have everything.
"""

import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlflow
import requests
import sqlalchemy.exc
from filelock import FileLock
from mlflow.exceptions import MlflowException

from nlistral.errors import ConfigError
from nlistral.revision import git

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
# MLflow's UI reads this tag in older releases; MLflow 3.17 ignores it (docs/experiments.md "MLflow": the runs URL).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow's HTTP client retries a dead server for minutes per call by default; these apply unless the user set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip
WRITE_ERRORS = (MlflowException, requests.RequestException, sqlalchemy.exc.OperationalError, OSError)
WRITE_ATTEMPTS = 3
LOCK_TIMEOUT_S = 600
ADAPTER_TAG = "adapter_sha256"  # io.content_digest of models/adapter, on the run that trained it


def resolve_uri(uri: str) -> str:
    """`mlflow.tracking_uri` with a relative sqlite path made absolute: relative to the repo DVC runs in (DVC_ROOT:
    for a queued experiment the user's repo, not its temporary copy, so sweeps log into the repo's own mlflow.db),
    else to the working directory (MLflow caches stores by URI, so a relative one could reach another folder's db)."""
    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE) :]).is_absolute():
        return SQLITE + str(Path(os.environ.get("DVC_ROOT") or os.getcwd()) / uri[len(SQLITE) :])
    return uri


def store_lock(uri: str):
    """A lock across processes for a SQLite store (`mlflow.db.lock` beside it); nothing for a server."""
    if not uri.startswith(SQLITE):
        return nullcontext()
    path = Path(uri[len(SQLITE) :])
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)


def _check_server(uri: str) -> None:
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=30).raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(f"MLflow tracking server {uri} does not answer ({type(err).__name__}): start it, or set "
                          "mlflow.tracking_uri (default sqlite:///mlflow.db)") from None  # fmt: skip


def connect(cfg):
    """Point MLflow at the configured store and experiment (created once, under the lock); -> the experiment."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = resolve_uri(cfg.mlflow.tracking_uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    for attempt in range(WRITE_ATTEMPTS):
        try:
            with store_lock(uri):  # schema creation/migration and experiment creation happen once
                experiment = mlflow.set_experiment(cfg.mlflow.experiment)
                for key, value in EXPERIMENT_KIND.items():
                    if key not in experiment.tags:
                        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
            return experiment
        except WRITE_ERRORS as err:
            # A server takes no lock of ours: two machines creating the experiment or its tag at once make one of
            # them fail (UNIQUE constraint); the next attempt finds what the other wrote.
            if attempt + 1 == WRITE_ATTEMPTS:
                raise ConfigError(f"MLflow tracking store {uri}: {str(err).splitlines()[0]}") from None


def run_name() -> str:
    """The DVC experiment's name, else `train <short commit>` (else `train`)."""
    if name := os.environ.get("DVC_EXP_NAME"):
        return name
    commit = git("rev-parse", "--short", "HEAD")
    return f"train {commit}" if commit else "train"


def provenance_tags() -> dict:
    """Where a run came from: git commit and dirty state, DVC experiment name (absent values left out)."""
    commit = git("rev-parse", "HEAD")
    tags = {
        "git_commit": commit,
        "git_dirty": None if commit is None else str(bool(git("status", "--porcelain"))),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
    }
    return {k: v for k, v in tags.items() if v is not None}


def run_of_adapter(digest: str) -> str | None:
    """The newest run tagged with this adapter digest, in any experiment of the store (None if there is none)."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.{ADAPTER_TAG} = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")  # fmt: skip
    return runs[0].info.run_id if runs else None


def run_exists(run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
        return True
    except MlflowException:
        return False


class Run:
    """The open MLflow run of a stage. `log(fn, ...)` calls an `mlflow.log_*` function: a failed write is retried,
    then the run stops logging (what follows is counted as missed) so that the stage goes on."""

    def __init__(self, stage: str, info):
        self.stage = stage
        self.info = info
        self.lost = None  # the error after which nothing more was logged
        self.missed = 0

    def log(self, fn, *args, **kwargs) -> None:
        if self.lost is None:
            for attempt in range(WRITE_ATTEMPTS):
                try:
                    return fn(*args, **kwargs)
                except WRITE_ERRORS as err:
                    error = err
                    if attempt + 1 < WRITE_ATTEMPTS:
                        time.sleep(2**attempt)
            self.lost = str(error).splitlines()[0][:300]
            log.warning("%s: MLflow write failed, logging no more of this run: %s", self.stage, self.lost)
        self.missed += 1

    def warning(self) -> str | None:
        if self.lost is None:
            return None
        return (f"{self.stage}: warning: MLflow ({mlflow.get_tracking_uri()}) missed {self.missed} write(s) of run "
                f"{self.info.run_id} after: {self.lost}. The stage's metrics files are complete.")  # fmt: skip


@contextmanager
def start_run(stage: str, run_id: str | None = None, tags: dict | None = None):
    """Start (or continue `run_id`) a run named by `run_name`, tagged with `provenance_tags`; yields a `Run`; ends
    it FINISHED or FAILED.

    Call `connect` first. Failing to open the run is a ConfigError; failures after that only warn (see `Run`).
    """
    try:
        if run_id is None:  # a new run; a continued one keeps the name and provenance it started with
            info = mlflow.start_run(run_name=run_name(), tags=provenance_tags() | (tags or {})).info
        else:  # in its own experiment, whatever `mlflow.experiment` or another machine made the active one
            mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
            info = mlflow.start_run(run_id=run_id, tags=tags).info
    except WRITE_ERRORS as err:
        raise ConfigError(f"MLflow tracking store {mlflow.get_tracking_uri()}: {str(err).splitlines()[0]}") from None
    run = Run(stage, info)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.log(mlflow.end_run, status=status)
        if mlflow.active_run():  # end_run failed: forget the run locally all the same
            mlflow.tracking.fluent._active_run_stack.get().clear()
        if message := run.warning():
            print(message, file=sys.stderr)
