"""Experiment tracking with MLflow, and a no-op tracker when tracking is off (STYLE rule 33).

``create_tracker(cfg, primary=is_primary())`` returns an :class:`MLflowTracker` on the primary rank when a tracking
URI is configured (``tracking.uri`` or ``MLFLOW_TRACKING_URI``), else a :class:`NullTracker` whose methods do
nothing, so training and evaluation code never branches on tracking. ``mlflow`` is imported inside the functions
that use it: importing this module needs no MLflow and no server.

An HTTP tracking server is probed once at start (``GET <uri>/health``) under a short deadline: MLflow's own HTTP
client retries a dead server for minutes, and a step should fail in seconds with a message that says what to do.

Credentials never travel in a URI: :func:`tracking_credentials` takes ``user:password`` out of an ``http(s)`` URI
and names the values of MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (the CLIs export
them), the probe sends them as an ``Authorization`` header, and params, tags and messages show URIs redacted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dad_core.config import TrackingConfig, redact_uri, split_userinfo
from dad_core.distributed import getenv
from dad_core.errors import DADError

__all__ = [
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "check_tracking_server",
    "create_tracker",
    "ensure_experiment",
    "flatten_params",
    "git_sha",
    "is_transient",
    "experiment_link",
    "finish_pipeline_run",
    "lineage_tags",
    "log_dataset_input",
    "mlflow_key",
    "open_pipeline_run",
    "pipeline_parent_run",
    "redact_uri",
    "resolve_tracking_uri",
    "retry",
    "split_credentials",
    "tracking_credentials",
]

_logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")  # MLflow keys: alphanumerics, _ - . space / :
_USERNAME, _PASSWORD, _TOKEN = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
PIPELINE_RUN_TAG = "dad.pipeline_run_id"  # on every run of one pipeline run, the parent included
RUN_KIND_TAG = "dad.run_kind"  # pipeline (the parent), finetune-teacher, train-vqgan, cache-teacher, train-student
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
# MLflow's UI opens an experiment in the view its kind names; without it, 3.x guesses the GenAI (traces) view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingError(DADError):
    """The tracking server does not answer, or refuses a request. The message names the URI."""


# --- helpers ---------------------------------------------------------------------------------------------------


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` may help: network errors, a busy server, a locked sqlite database.

    MLflow's REST client already retries HTTP 429/5xx and refused connections with its own (long) backoff, so its
    "max retries exceeded" errors are not retried again here.
    """
    message = str(err)
    if "Max retries exceeded" in message:
        return False
    if "database is locked" in message:
        return True
    if getattr(err, "error_code", None) in _TRANSIENT_CODES:
        return True
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    library, name = type(err).__module__.split(".")[0], type(err).__name__
    return library in ("requests", "urllib3", "botocore") and ("Connection" in name or "Timeout" in name)


def retry(
    fn: Callable[[], T],
    attempts: int = 3,
    base_delay: float = 0.5,
    *,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn()``; on a transient error wait ``base_delay * 2**k`` seconds and try again, ``attempts`` in all.

    Returns:
        What ``fn`` returns.

    Raises:
        ValueError: ``attempts`` is below 1.
        Exception: the last error, once ``attempts`` calls failed or an error is not transient.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts):
        try:
            return fn()
        except Exception as err:
            if not transient(err):
                raise
            delay = base_delay * 2 ** (attempt - 1)
            _logger.warning("transient error (%s); retry %d/%d in %.1f s", err, attempt, attempts - 1, delay)
            time.sleep(delay)
    return fn()


def resolve_tracking_uri(uri: str | None) -> str | None:
    """``uri`` when given, else ``MLFLOW_TRACKING_URI``, else None (tracking off)."""
    return uri or getenv("MLFLOW_TRACKING_URI") or None


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """Take ``user:password@`` out of a URI: ``http://u:p%40ss@host:5000`` -> ``("http://host:5000", "u", "p@ss")``.

    User and password are percent-decoded (RFC 3986 userinfo); the userinfo ends at the *last* ``@`` before the first
    ``/``, so a raw ``@`` in a password stays in the password. ``http://token@host`` gives a user and no password.

    Returns:
        ``(uri without userinfo, user or None, password or None)``; ``(uri, None, None)`` when it has none.
    """
    clean, userinfo = split_userinfo(uri)
    if not userinfo:
        return clean, None, None
    user, colon, password = userinfo.partition(":")
    return clean, urllib.parse.unquote(user) or None, urllib.parse.unquote(password) if colon else None


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def tracking_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """The URI to give MLflow, and the MLflow variables to export so that its HTTP client still authenticates.

    Only ``http(s)`` URIs are split: a database URI (``postgresql://u:p@db/mlflow``) needs its password to connect
    and is only ever written redacted. Variables already set to the same value are left out of the result.

    Returns:
        ``(uri without credentials, {"MLFLOW_TRACKING_USERNAME": ..., "MLFLOW_TRACKING_PASSWORD": ...})``.

    Raises:
        TrackingError: the URI's credentials differ from those already in the environment, or it has a user name
            without a password (or the reverse) and the environment does not hold the other: MLflow sends basic
            auth only with both.
    """
    if not _is_http(uri):
        return uri, {}
    clean, user, password = split_credentials(uri)
    if user is None and password is None:
        return clean, {}
    found = {name: value for name, value in ((_USERNAME, user), (_PASSWORD, password)) if value is not None}
    if any(getenv(name) not in (None, value) for name, value in found.items()):
        raise TrackingError(
            f"tracking URI {redact_uri(uri)} carries credentials that differ from {_USERNAME}/{_PASSWORD}: "
            "keep only one of them"
        )
    if not all(found.get(name) or getenv(name) for name in (_USERNAME, _PASSWORD)):
        raise TrackingError(
            f"tracking URI {redact_uri(uri)} has a user name or a password without the other (MLflow needs both): "
            f"write user:password, or set {_USERNAME}/{_PASSWORD} (or {_TOKEN} for a token, with no user in the URI)"
        )
    return clean, {name: value for name, value in found.items() if getenv(name) != value}


def _auth_header(user: str | None, password: str | None) -> dict[str, str]:
    """The ``Authorization`` header MLflow's client would send: basic from user and password, else a bearer token."""
    user, password = user or getenv(_USERNAME), password or getenv(_PASSWORD)
    if user and password:
        return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}
    token = getenv(_TOKEN)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _probe(url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[bool, str]:
    """One GET; (answered, reason). Any HTTP status below 500 counts as an answer (a 401 is a server, too)."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return True, f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return err.code < 500, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return False, str(getattr(err, "reason", err))


def check_tracking_server(uri: str, timeout_s: float = 10.0, *, hint: str = "unset MLFLOW_TRACKING_URI") -> None:
    """Fail fast when an ``http(s)://`` tracking server does not answer ``GET <uri>/health``; other URIs pass.

    Tries a few times with backoff (0.25 s, 0.5 s, 1 s, ...) until ``timeout_s`` has passed. Credentials in ``uri``
    (or in ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) go in an ``Authorization`` header: name resolution
    and the request line only ever see the bare URI.

    Raises:
        TrackingError: no answer before the deadline.
    """
    if not _is_http(uri):
        return
    clean, user, password = split_credentials(uri)
    url, headers = clean.rstrip("/") + "/health", _auth_header(user, password)
    deadline = time.monotonic() + timeout_s
    delay, reason = 0.25, "no attempt"
    for _ in range(6):
        answered, reason = _probe(url, timeout=max(0.1, deadline - time.monotonic()), headers=headers)
        if answered:
            return
        if time.monotonic() + delay >= deadline:
            break
        time.sleep(delay)
        delay *= 2
    raise TrackingError(f"MLflow tracking server at {clean} does not answer ({reason}): start it or {hint}")


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) dict or dataclass into dotted keys with string values, as MLflow params hold them.

    Lists become JSON; values longer than MLflow's limit (6000 characters) are cut and end in ``...``. A value that is
    a URI with credentials is logged redacted (``http://***@host``).
    """
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, list | tuple | Mapping) else redact_uri(str(value))
        flat[mlflow_key(name)] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return flat


def mlflow_key(name: str) -> str:
    """``name`` with characters MLflow refuses in metric/param/tag keys replaced by ``_`` (at most 250)."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:250]


def git_sha(repo: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of ``repo`` (default: the working folder), or ``"unknown"`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def lineage_tags(
    *,
    dataset_hash: str | None = None,
    cache_hash: str | None = None,
    teacher: str | None = None,
    dvc_rev: str | None = None,
    pipeline_run_id: str | None = None,
    repo: str | Path | None = None,
    **extra: Any,
) -> dict[str, str]:
    """Tags that say what produced a run or model: ``dad.git_sha`` always, the others when given.

    Keys: ``dad.git_sha``, ``dad.dataset_hash``, ``dad.cache_hash``, ``dad.teacher``, ``dad.dvc_rev``,
    ``dad.pipeline_run_id``, and ``dad.<key>`` for each extra keyword.
    """
    values = {
        "dataset_hash": dataset_hash,
        "cache_hash": cache_hash,
        "teacher": teacher,
        "dvc_rev": dvc_rev,
        "pipeline_run_id": pipeline_run_id,
        **extra,
    }
    tags = {"dad.git_sha": git_sha(repo)}
    tags.update({f"dad.{key}": str(value) for key, value in values.items() if value not in (None, "")})
    return tags


def _artifact_root_for(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database (``<db folder>/mlartifacts/<experiment>``), not in the cwd."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    folder = re.sub(r"[^\w\-.]", "_", experiment) or "default"
    return (db.resolve().parent / "mlartifacts" / folder).as_uri()


def ensure_experiment(client: Any, name: str, uri: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``, or beside a sqlite db) when missing."""
    from mlflow.exceptions import MlflowException

    found = retry(lambda: client.get_experiment_by_name(name))
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} at {redact_uri(uri)} is deleted: restore it or rename")
        if EXPERIMENT_KIND_TAG not in (found.tags or {}):  # made by hand or by an older version; a set kind stays
            retry(lambda: client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND))
        return found.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_location or _artifact_root_for(uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except MlflowException as err:  # created meanwhile by another process
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_link(ui_url: str, experiment_id: str) -> str:
    """The link that opens an experiment's runs table in the MLflow UI at ``ui_url``.

    MLflow 3.x's UI picks its GenAI or model-training view from the browser (default GenAI, remembered per browser)
    or from this link's ``workflowType``, not from the experiment's kind tag: the link names the training view.
    """
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def pipeline_parent_run(client: Any, experiment_id: str, pipeline_run_id: str) -> str:
    """The id of the parent run of pipeline run ``pipeline_run_id`` in the experiment, created when missing.

    The pipeline's first step (prepare-data, never cached) creates it before any other step runs, so the steps that
    run in parallel later only find it. Should two creators still meet, each searches again after creating and all
    keep the oldest parent (start time, then run id); a creator that lost deletes its own, still empty, run.
    """
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' AND tags.`{RUN_KIND_TAG}` = 'pipeline'"

    def oldest() -> str | None:
        found = retry(lambda: client.search_runs([experiment_id], query, max_results=10))
        ordered = sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))
        return ordered[0].info.run_id if ordered else None

    existing = oldest()
    if existing is not None:
        return existing
    short = re.sub(r"[^\w-]", "", pipeline_run_id)[-8:]
    created = retry(
        lambda: client.create_run(
            experiment_id,
            run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M')} {short}".strip(),
            tags={PIPELINE_RUN_TAG: pipeline_run_id, RUN_KIND_TAG: "pipeline", "dad.git_sha": git_sha()},
        )
    ).info.run_id
    winner = oldest() or created
    if winner != created:
        retry(lambda: client.delete_run(created))
    return winner


def _pipeline_parent(cfg: TrackingConfig) -> tuple[Any, str] | None:
    """``(client, parent run id)`` of ``cfg.pipeline_run_id``; None when tracking is off or there is no pipeline run."""
    clean = _reachable_uri(cfg) if cfg.pipeline_run_id else None
    if clean is None:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=clean)
    experiment_id = ensure_experiment(client, cfg.experiment, clean, cfg.artifact_location)
    return client, pipeline_parent_run(client, experiment_id, cfg.pipeline_run_id)


def open_pipeline_run(cfg: TrackingConfig, data_root: str | Path, params: Mapping[str, Any]) -> str | None:
    """Create the parent run of ``cfg.pipeline_run_id`` (the pipeline's first step calls it) with the run's
    configuration as params and the prepared dataset as its input; returns its id (None: nothing to track)."""
    found = _pipeline_parent(cfg)
    if found is None:
        return None
    client, parent = found
    from mlflow.entities import Param

    flat = flatten_params(params)
    logged = retry(lambda: client.get_run(parent)).data.params
    fresh = [Param(k, v) for k, v in flat.items() if k not in logged]  # a retried step: params are immutable
    if fresh:
        retry(lambda: client.log_batch(parent, params=fresh))  # the client splits it into batches MLflow accepts
    log_dataset_input(client, parent, data_root, "prepared")
    _logger.info("MLflow pipeline run %s (pipeline run %s)", parent, cfg.pipeline_run_id)
    return parent


def finish_pipeline_run(
    cfg: TrackingConfig, status: str = "FINISHED", metrics: Mapping[str, Any] | None = None
) -> None:
    """Mark the parent run of ``cfg.pipeline_run_id`` ``status``; the pipeline's last step calls it with the
    evaluation's metrics, so the runs table compares pipeline runs on one row each.

    Does nothing when tracking is off or the step is not part of a pipeline run.
    """
    found = _pipeline_parent(cfg)
    if found is None:
        return
    client, parent = found
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {mlflow_key(k): v for k, v in ((k, _numeric(v)) for k, v in (metrics or {}).items()) if v is not None}
    if values:
        retry(lambda: client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in values.items()]))
    retry(lambda: client.set_terminated(parent, status))


def log_dataset_input(client: Any, run_id: str, data_root: str | Path, context: str) -> None:
    """Record the prepared dataset at ``data_root`` as an input of the run (the run page's "Datasets").

    The digest is the dataset hash prepare-data recorded (MLflow keeps 36 characters; the profile holds all of it),
    the source is where the images came from (DVC repository, revision and path; the folder; or the embedded set),
    and the input tag ``mlflow.data.context`` says what the run used it for (training, evaluation, ...).
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    manifest_file = Path(data_root) / "manifest.json"
    if not manifest_file.is_file():
        _logger.warning("no manifest.json in %s: the dataset is not recorded as a run input", data_root)
        return
    manifest = json.loads(manifest_file.read_text())
    source = dict(manifest.get("source") or {})
    kind = str(source.get("kind", "local"))
    name = {"dvc": source.get("path"), "folder": Path(str(source.get("path", ""))).name}.get(kind) or kind
    where = {k: redact_uri(str(v)) for k, v in source.items() if k in ("kind", "name", "path", "repo", "rev", "commit")}
    profile = {
        "dataset_hash": manifest.get("dataset_hash"),
        "num_classes": len((manifest.get("classes") or {}).get("ids", [])),
        **{split: info.get("count") for split, info in (manifest.get("splits") or {}).items()},
    }
    entity = Dataset(
        name=str(name),
        digest=str(manifest.get("dataset_hash", ""))[:36],
        source_type=kind,
        source=json.dumps(where),
        profile=json.dumps(profile),
    )
    dataset = DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])
    retry(lambda: client.log_inputs(run_id, datasets=[dataset]))


def _numeric(value: Any) -> float | None:
    if value is None or isinstance(value, bool | str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- trackers --------------------------------------------------------------------------------------------------


class Tracker:
    """The tracking interface. Also a context manager: a run left by an exception is marked FAILED."""

    enabled = False

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) dict or config dataclass as dotted params."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values; None and non-numbers are skipped."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder (under its own name unless ``artifact_path`` is given)."""

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store ``obj`` as a JSON/YAML artifact (the extension of ``artifact_file`` decides)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings)."""

    def log_dataset(self, data_root: str | Path, context: str) -> None:
        """Record the prepared dataset at ``data_root`` as a run input (see :func:`log_dataset_input`)."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(Tracker):
    """Tracking is off (no URI, or not the primary rank): every method does nothing."""


class MLflowTracker(Tracker):
    """One MLflow run: started (or resumed, or nested under the active run) by :meth:`start`.

    Logging calls address the run by id through an ``MlflowClient``, so they go to this run even when other
    code starts nested runs meanwhile; the run stays the active one for code that uses ``mlflow.*`` directly.
    """

    enabled = True

    def __init__(
        self,
        uri: str,
        experiment: str = "dad",
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        system_metrics: bool = False,
        artifact_location: str | None = None,
        pipeline_run_id: str = "",
        kind: str | None = None,
    ) -> None:
        self.uri, self.experiment = uri, experiment
        self._pipeline_run_id, self._kind, self.parent_run_id = pipeline_run_id, kind, None
        self._run_name, self._resume_id, self._tags = run_name, run_id, dict(tags or {})
        self._system_metrics, self._artifact_location = system_metrics, artifact_location
        self._run_id: str | None = None
        self._client: Any = None
        self._owns_run = False
        self._done = False
        self._params: dict[str, str] = {}
        self._previous_uri: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def start(self) -> MLflowTracker:
        """Set the tracking URI and experiment and start the run.

        Raises:
            TrackingError: the server refuses, or the run to resume does not exist.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        # The fluent API (mlflow.pytorch.log_model in the caller's code) follows the global URI: set it for the
        # run's lifetime and restore it in finish().
        self._previous_uri = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(self.uri)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        active = mlflow.active_run()
        try:
            if active is not None and active.info.run_id == self._resume_id:
                self._run_id = self._resume_id  # the caller's run: log to it, leave ending it to the caller
            else:
                self._start_run(mlflow, nested=active is not None)
            if self._resume_id:
                self._params = dict(self._client.get_run(self._run_id).data.params)
            self.set_tags(self._tags)
        except Exception as err:
            self.finish("FAILED")
            mlflow.set_tracking_uri(self._previous_uri)
            if isinstance(err, MlflowException):
                raise TrackingError(f"MLflow at {redact_uri(self.uri)}: {err.message}") from err
            raise
        _logger.info("MLflow run %s in experiment %r at %s", self._run_id, self.experiment, redact_uri(self.uri))
        return self

    def _start_run(self, mlflow: Any, nested: bool) -> None:
        experiment_id, tags = None, {}
        if self._resume_id is None:
            experiment_id = ensure_experiment(self._client, self.experiment, self.uri, self._artifact_location)
            if self._kind:
                tags[RUN_KIND_TAG] = self._kind
            if self._pipeline_run_id and not nested:  # a step of a pipeline run: nest it under the run's parent
                self.parent_run_id = pipeline_parent_run(self._client, experiment_id, self._pipeline_run_id)
                tags.update({PARENT_TAG: self.parent_run_id, PIPELINE_RUN_TAG: self._pipeline_run_id})
        system = self._system_metrics and _psutil_available()
        run = retry(
            lambda: mlflow.start_run(
                run_id=self._resume_id,
                experiment_id=experiment_id,
                run_name=self._run_name,
                nested=nested,
                tags=tags or None,
                log_system_metrics=system,
            )
        )
        self._run_id, self._owns_run = run.info.run_id, True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        fresh = {}
        for key, value in flatten_params(params).items():
            if key in self._params and self._params[key] != value:
                _logger.warning(
                    "param %s already logged as %r; keeping it (MLflow params are immutable)",
                    key,
                    self._params[key][:80],
                )
            elif key not in self._params:
                fresh[key] = value
        if fresh:
            self._batch(params=[Param(k, v) for k, v in fresh.items()])
            self._params.update(fresh)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {mlflow_key(k): v for k, v in ((k, _numeric(v)) for k, v in metrics.items()) if v is not None}
        if values:
            self._batch(metrics=[Metric(k, v, now, step or 0) for k, v in values.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log not found: {path}")
        if path.is_dir() and artifact_path is None:
            artifact_path = path.name  # a folder keeps its name: model/ -> model/state.pt, model/meta.json
        upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        retry(lambda: upload(self._run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        retry(lambda: self._client.log_dict(self._run_id, obj, artifact_file))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._batch(tags=[RunTag(mlflow_key(k), redact_uri(str(v))[:MAX_TAG_VALUE]) for k, v in tags.items()])

    def log_dataset(self, data_root: str | Path, context: str) -> None:
        log_dataset_input(self._client, self._run_id, data_root, context)

    def _batch(self, **entities: Any) -> None:
        retry(lambda: self._client.log_batch(self._run_id, **entities))

    def finish(self, status: str = "FINISHED") -> None:
        if self._done or self._run_id is None:
            return
        self._done = True
        import mlflow

        try:
            active = mlflow.active_run()
            if not self._owns_run:
                pass
            elif active is not None and active.info.run_id == self._run_id:
                mlflow.end_run(status)
            else:
                self._client.set_terminated(self._run_id, status)
            if status != "FINISHED" and self.parent_run_id:  # with its step; the last step sets FINISHED
                self._client.set_terminated(self.parent_run_id, status)
        except Exception as err:  # noqa: BLE001 - a run left RUNNING must not fail the step that produced it
            _logger.warning("could not mark MLflow run %s %s: %s", self._run_id, status, err)
        finally:
            mlflow.set_tracking_uri(self._previous_uri)


def _psutil_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        _logger.warning("psutil is not installed: system metrics are not logged")
        return False
    return True


def _reachable_uri(cfg: TrackingConfig) -> str | None:
    """The tracking URI of ``cfg`` without credentials, its server probed; None when tracking is off.

    Raises:
        TrackingError: the URI carries credentials that are not in the environment, or the server does not answer.
    """
    uri = resolve_tracking_uri(cfg.uri)
    if uri is None:
        return None
    clean, missing = tracking_credentials(uri)
    if missing:
        raise TrackingError(
            f"tracking URI {redact_uri(uri)} carries credentials: set {_USERNAME}/{_PASSWORD} instead "
            "(the dad CLIs do this for you)"
        )
    check_tracking_server(clean, cfg.timeout_s, hint="fix tracking.uri" if cfg.uri else "unset MLFLOW_TRACKING_URI")
    return clean


def create_tracker(
    cfg: TrackingConfig,
    *,
    primary: bool,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    system_metrics: bool | None = None,
    kind: str | None = None,
) -> Tracker:
    """A started :class:`MLflowTracker`, or a :class:`NullTracker` when not primary or no URI is configured.

    Args:
        cfg: URI (else ``MLFLOW_TRACKING_URI``), experiment, probe timeout, system metrics, artifact location.
        primary: whether this process logs (rank 0); the others get a NullTracker.
        run_name: name of a new run.
        tags: run tags, e.g. :func:`lineage_tags`.
        run_id: resume this run instead of starting one (for example a resumed training job).
        system_metrics: override ``cfg.system_metrics``.
        kind: the ``dad.run_kind`` tag of a new run (the step: ``train-student``, ``cache-teacher``, ...); with
            ``cfg.pipeline_run_id`` set, the run is a child of that pipeline run's parent run.

    Returns:
        The tracker; use it as a context manager so an exception marks the run FAILED.

    Raises:
        TrackingError: the tracking server does not answer within ``cfg.timeout_s``, or refuses the run; or the URI
            carries credentials that are not in ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (the library does not
            write the environment: the CLIs move them there, see ``dad_core.cli._common``).
    """
    clean = _reachable_uri(cfg) if primary else None
    if clean is None:
        return NullTracker()
    tracker = MLflowTracker(
        clean,
        cfg.experiment,
        run_name=run_name,
        run_id=run_id,
        tags=tags,
        system_metrics=cfg.system_metrics if system_metrics is None else system_metrics,
        artifact_location=cfg.artifact_location,
        pipeline_run_id=cfg.pipeline_run_id,
        kind=kind,
    )
    return tracker.start()
