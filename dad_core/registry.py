"""The MLflow model registry: register a trained student, and promote the challenger to champion behind a gate.

Registration (STYLE rule 36) logs the student as an MLflow PyTorch model with a signature, an input example, pinned
pip requirements, its class list and preprocessing, registers a new version and points an alias at it (aliases
only: stages are deprecated since MLflow 2.9, mlflow/mlflow#10336). The version is tagged with its lineage and
with the metrics it was registered with (``dad.metric.<key>``), so the promotion gate still works when the run
that logged them is gone. The first version of a model also becomes ``champion``.

Promotion compares ``@challenger`` with ``@champion``: the challenger wins when the OOD metric improves by at
least ``margin`` and the clean metric drops by at most ``clean_tolerance``. The decision is written onto the
challenger version as tags (``dad.promotion``, ``dad.promotion_reason``, ``dad.promotion_compared_to``).

``mlflow`` and ``torch`` are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dad_core.errors import DADError
from dad_core.tracking import (
    TrackingError,
    check_tracking_server,
    ensure_experiment,
    is_transient,
    lineage_tags,
    mlflow_key,
    redact_uri,
    resolve_tracking_uri,
    retry,
    tracking_credentials,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_TRACKING_URI",
    "Gate",
    "PromotionDecision",
    "RegistryError",
    "format_table",
    "gate_outcome",
    "load_eval_metrics",
    "promote",
    "register_model",
    "version_metrics",
]

_logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # DESIGN 5: the local store, when no URI is configured
METRIC_TAG = "dad.metric."  # version tag prefix holding the metrics a version was registered with
_META_LINEAGE = (
    "git_sha",
    "dataset_hash",
    "cache_hash",
    "teacher",
    "dvc_rev",
    "vqgan",
    "config_hash",
    "teacher_mode",
    "attack_mode",
    "loss_variant",
)  # meta.json keys copied onto the version as dad.<key> tags


class RegistryError(DADError):
    """A registry request failed (unknown model, missing alias, refused by the server). The message says which."""


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise RegistryError(f"MLflow at {redact_uri(uri)}: {err.message}") from err


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``, ``register_model``) at ``uri`` for the block, then restore it."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets MLFLOW_TRACKING_URI again, as it was


def _connect(tracking_uri: str | None, timeout_s: float) -> str:
    uri, missing = tracking_credentials(resolve_tracking_uri(tracking_uri) or DEFAULT_TRACKING_URI)
    if missing:  # the library never writes the environment: the CLIs move URI credentials there
        raise TrackingError(
            f"tracking URI {redact_uri(uri)} carries credentials: set {' and '.join(sorted(missing))} instead "
            "(the `dad` commands do this for you)"
        )
    check_tracking_server(uri, timeout_s, hint="fix --tracking-uri / MLFLOW_TRACKING_URI")
    return uri


# --- registration ----------------------------------------------------------------------------------------------


def load_eval_metrics(path: str | Path) -> dict[str, float]:
    """Every numeric top-level value of an evaluation report (``clean_top1``, ``ood_mean_top1``, ...).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RegistryError: the file is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation report not found: {path}")
    try:
        report = json.loads(path.read_text())
    except ValueError as err:
        raise RegistryError(f"evaluation report {path} is not valid JSON: {err}") from err
    if not isinstance(report, dict):
        raise RegistryError(f"evaluation report {path}: expected a JSON object at the top level")
    return {k: float(v) for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    meta_path = checkpoint_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no student checkpoint at {checkpoint_dir} (expected meta.json and state.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise RegistryError(f"{meta_path} is not valid JSON: {err}") from err
    missing = [key for key in ("model", "num_classes", "image_size") if key not in meta]
    if missing:
        raise RegistryError(f"{meta_path}: missing key(s) {missing}")
    return meta


def _default_preprocessing(student: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    from dad_core.evaluate import resolve_eval_transform

    crop_pct, interpolation = resolve_eval_transform(student)
    size = int(meta["image_size"])
    return {
        "input": f"float32 RGB [B, 3, {size}, {size}] in [0, 1]; the model normalizes internally",
        "image_size": size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": [float(v) for v in student.mean.flatten()],
        "std": [float(v) for v in student.std.flatten()],
    }


def _pip_requirements() -> list[str]:
    """The model's runtime pins, as installed (a local build suffix such as ``+cu130`` dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "timm", "numpy", "pandas", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package).split('+')[0]}")
    return pins


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:5000]


def _version_tags(meta: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, Any] | None) -> dict:
    from_meta = {f"dad.{k}": _tag_value(meta[k]) for k in _META_LINEAGE if meta.get(k) not in (None, "")}
    from_meta["dad.student"] = str(meta["model"])
    values = {f"{METRIC_TAG}{mlflow_key(k)}": repr(round(float(v), 4)) for k, v in metrics.items()}  # no 28.52999..
    return {**lineage_tags(), **from_meta, **values, **{str(k): str(v) for k, v in (tags or {}).items()}}


def _log_model(student: Any, size: int, info: dict[str, Any]) -> str:
    """Log the student into the active run as a pyfunc model with no pickle in it; returns the model URI.

    Weights as safetensors and ``model_info.json`` (what rebuilds the network); ``MLmodel`` names the installed
    ``dad_core.mlflow_model`` as its loader, so no code travels with the model (:mod:`dad_core.mlflow_model`).
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from dad_core.mlflow_model import LOADER_MODULE, StudentPredictor, save_model_data

    example = torch.full((1, 3, size, size), 0.5).numpy()
    signature = infer_signature(example, StudentPredictor(student, info).predict(example))
    with tempfile.TemporaryDirectory() as folder:
        data = save_model_data(student, info, Path(folder) / "student")
        logged = retry(
            lambda: mlflow.pyfunc.log_model(
                name="model",
                loader_module=LOADER_MODULE,
                data_path=str(data),
                signature=signature,
                input_example=example,
                pip_requirements=_pip_requirements(),
                metadata={"dad_format": "safetensors", "student": info["student"]},
            )
        )
    return logged.model_uri


def _log_student(
    student: Any,
    size: int,
    info: dict[str, Any],
    metrics: Mapping[str, float],
    *,
    run_id: str | None,
    experiment: str,
    uri: str,
    run_name: str,
) -> tuple[str, str]:
    """Log metrics, model info and the model in ``run_id`` (or a new run); returns ``(run_id, model URI)``."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    active = mlflow.active_run()
    own = active is None or active.info.run_id != run_id  # else: the caller's run, left open
    if own:
        experiment_id = None if run_id else ensure_experiment(client, experiment, uri)
        active = mlflow.start_run(
            run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else run_name, nested=active is not None
        )
    logged_run = active.info.run_id
    status = "FAILED" if run_id is None else "FINISHED"  # a failed registration does not fail a training run
    try:
        now = int(time.time() * 1000)
        entries = [Metric(mlflow_key(k), v, now, 0) for k, v in metrics.items()]
        retry(lambda: client.log_batch(logged_run, metrics=entries))
        retry(lambda: client.log_dict(logged_run, info, "model_info.json"))
        model_uri = _log_model(student, size, info)
        status = "FINISHED"
    finally:
        if own:
            mlflow.end_run(status)
    return logged_run, model_uri


@dataclass(frozen=True)
class Gate:
    """The promotion gate: ``metric`` must gain at least ``margin``; ``clean_metric`` may lose ``clean_tolerance``."""

    metric: str = "ood_mean_top1"
    margin: float = 0.0
    clean_metric: str = "clean_top1"
    clean_tolerance: float = 1.0

    @classmethod
    def from_config(cls, registry: Any) -> Gate:
        """The gate of a :class:`dad_core.config.RegistryConfig`."""
        return cls(registry.metric, registry.margin, registry.clean_metric, registry.clean_tolerance)


def register_model(
    checkpoint_dir: str | Path,
    metrics: Mapping[str, float],
    *,
    name: str,
    alias: str = CHALLENGER,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    classes: list[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    experiment: str = "dad",
    timeout_s: float = 10.0,
    gate: Gate | None = None,
    promote: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """Log the student in ``checkpoint_dir`` as an MLflow model, register a new version of ``name``, set ``alias``.

    Registering the same checkpoint again makes a new version. A version registered while no version holds
    ``champion`` also becomes ``champion`` (decision ``accepted``, "first champion"). With ``promote`` the new
    version goes through the gate against the champion at once. Alias decisions hold the model's promotion lock
    (:func:`_promotion_lock`), so concurrent registrations and promotions never both claim ``champion``.

    Args:
        checkpoint_dir: student checkpoint (``state.safetensors`` + ``meta.json`` with model, num_classes,
            image_size).
        metrics: evaluation metrics, logged to the run and written as ``dad.metric.<key>`` version tags; they must
            hold the gate's two metrics.
        name: registered model name.
        alias: alias set on the new version (``challenger``; ``champion`` forces it live, skipping the gate).
        tags: version tags, e.g. lineage (``dad.dvc_rev``, ``dad.pipeline_run_id``); they override the ones read
            from ``meta.json`` and the git SHA of the working folder.
        tracking_uri: MLflow URI; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
        run_id: log the model in this run instead of a new one; default: the run that trained the checkpoint
            (``meta["mlflow_run_id"]``) when it exists on this server, so the version's source run is the training run.
        classes: class names; default ``meta["classes"]``.
        preprocessing: what the model expects; default derived from the student (size, crop, mean/std).
        experiment: experiment of the new run when ``run_id`` is None.
        timeout_s: how long to wait for an HTTP tracking server to answer.
        gate: the promotion gate (default :class:`Gate`); its metrics must be in ``metrics``.
        promote: run the gate for the new version now, as ``dad promote`` would.
        description: the version's description (Markdown, e.g. the evaluation table), shown on its page.

    Returns:
        ``{"name", "version", "run_id", "model_uri", "aliases", "promotion"}``; ``model_uri`` is
        ``models:/<name>/<version>``; ``promotion`` is the decision (None when none was made).

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint_dir``.
        TrackingError: the tracking server does not answer.
        RegistryError: ``alias`` is not valid, ``metrics`` lack a gate metric, or MLflow refused a request.
    """
    from dad_core.student import load_student

    gate = gate or Gate()
    if not re.fullmatch(r"[\w-]{1,255}", alias) or re.fullmatch(r"latest|v\d+", alias.lower()):
        raise RegistryError(f"alias {alias!r} is not valid: letters, digits, _ and -, not 'latest' nor v<number>")
    values = {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    missing = [key for key in dict.fromkeys((gate.metric, gate.clean_metric)) if key not in values]
    if missing:
        raise RegistryError(
            f"the evaluation metrics lack the promotion gate's {missing} (have {sorted(values)[:8]}): "
            "register the report of a full evaluation, or set registry.metric / registry.clean_metric"
        )
    uri = _connect(tracking_uri, timeout_s)
    checkpoint_dir = Path(checkpoint_dir)
    meta = _read_meta(checkpoint_dir)
    student = load_student(checkpoint_dir, device="cpu")
    info = {
        "classes": list(classes or meta.get("classes") or []),
        "preprocessing": dict(preprocessing or _default_preprocessing(student, meta)),
        "class_names": list(meta.get("class_names") or []),
        "student": meta["model"],
        "num_classes": int(meta["num_classes"]),
        "image_size": int(meta["image_size"]),
    }
    with _mlflow_errors(uri), _tracking_uri(uri):
        import mlflow

        run_id = run_id or _training_run(mlflow.MlflowClient(uri), meta.get("mlflow_run_id"))
        logged_run, logged_uri = _log_student(
            student,
            int(meta["image_size"]),
            info,
            values,
            run_id=run_id,
            experiment=experiment,
            uri=uri,
            run_name=f"register-{name}",
        )
        version = retry(lambda: mlflow.register_model(logged_uri, name, tags=_version_tags(meta, values, tags))).version
        client = mlflow.MlflowClient(uri)
        if description:
            retry(lambda: client.update_model_version(name, version, description=description[:5000]))
        with _promotion_lock(client, name):
            aliases, decision = _assign_aliases(client, name, str(version), alias, gate if promote else None)
    _logger.info("registered %s version %s (%s)", name, version, ", ".join(aliases))
    return {
        "name": name,
        "version": str(version),
        "run_id": logged_run,
        "model_uri": f"models:/{name}/{version}",
        "aliases": aliases,
        "promotion": decision.to_dict() if decision is not None else None,
    }


def _training_run(client: Any, run_id: str | None) -> str | None:
    """``run_id`` when that run exists (and is not deleted) on this server, else None (e.g. trained elsewhere)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = retry(lambda: client.get_run(run_id))
    except MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def _assign_aliases(
    client: Any, name: str, version: str, alias: str, gate: Gate | None
) -> tuple[list[str], PromotionDecision | None]:
    """Point ``alias`` at ``version``; make it champion when there is none (or ``gate`` accepts it). Under the lock."""
    retry(lambda: client.set_registered_model_alias(name, alias, version))
    if alias == CHAMPION:
        return [alias], None
    decision = (
        _decide(client, name, version, gate or Gate()) if gate or CHAMPION not in _aliases(client, name) else None
    )
    if decision is None or not decision.promoted:
        return [alias], decision
    return [alias, CHAMPION], decision


def _aliases(client: Any, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model.

    Raises:
        RegistryError: no model is registered under ``name``.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = retry(lambda: client.get_registered_model(name))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"no registered model {name!r} at {redact_uri(client.tracking_uri)}") from err
    return {alias: str(version) for alias, version in dict(model.aliases).items()}


# --- promotion -------------------------------------------------------------------------------------------------

LOCK_SUFFIX = ".promotion-lock"  # the registered model whose existence is the lock (see _promotion_lock)
_NONCE_TAG, _SINCE_TAG, _HOLDER_TAG = "dad.lock.nonce", "dad.lock.since", "dad.lock.holder"
SEQUENCE_TAG = "dad.promotion_seq"  # on the registered model: decisions made so far; on a version: its number


@contextlib.contextmanager
def _promotion_lock(client: Any, name: str, *, timeout_s: float = 120.0, stale_s: float = 600.0) -> Iterator[None]:
    """Hold the promotion lock of ``name`` for the block: alias decisions on it happen one at a time.

    MLflow has no transactions, and its tags and aliases are last-writer-wins, so a check-then-set on them races
    (two writers both see "no champion" and both claim it). The one atomic compare-and-set it offers is creating a
    registered model: the store refuses a second one of the same name. So the lock is the registered model
    ``<name>.promotion-lock``, created with a tag holding a fresh nonce, and deleted by the holder whose nonce it
    still carries. A lock older than ``stale_s`` (its holder died) is deleted by the next waiter, if its nonce is
    unchanged, and then contended for by creation again, which still lets exactly one writer win.

    Raises:
        RegistryError: the lock stayed held for ``timeout_s`` (the message names the holder and how to clear it).
    """
    import os
    import random
    import socket
    import uuid

    from mlflow.exceptions import MlflowException

    lock, nonce = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline, delay = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={
                    _NONCE_TAG: nonce,
                    _SINCE_TAG: f"{time.time():.3f}",
                    _HOLDER_TAG: f"{socket.gethostname()}:{os.getpid()}",
                },
                description=f"Held while a registration or promotion of {name!r} decides its aliases; deleted after.",
            )
            break
        except MlflowException as err:
            # A lost race answers RESOURCE_ALREADY_EXISTS, or RESOURCE_DOES_NOT_EXIST when the holder released the
            # lock between the store's failed insert and its own re-read of the existing model (MLflow 3 re-reads it
            # to word the error). Either way another writer held the lock: wait and contend again.
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST") and not is_transient(err):
                raise
        holder = _lock_tags(client, lock)
        if holder.get(_NONCE_TAG) == nonce:  # our create went through although its answer was lost
            break
        if holder and time.time() - float(holder.get(_SINCE_TAG) or 0) > stale_s:
            _logger.warning("promotion lock %s of %s is stale; taking it over", lock, holder.get(_HOLDER_TAG))
            if _lock_tags(client, lock).get(_NONCE_TAG) == holder.get(_NONCE_TAG):
                _delete_lock(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"the promotion lock of {name!r} is held by {holder.get(_HOLDER_TAG, '?')} since "
                f"{time.strftime('%H:%M:%S', time.localtime(float(holder.get(_SINCE_TAG) or 0)))}; if no registration "
                f"or promotion is running, delete the registered model {lock!r}"
            )
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        if _lock_tags(client, lock).get(_NONCE_TAG) == nonce:
            _delete_lock(client, lock)


def _delete_lock(client: Any, lock: str) -> None:
    """Delete the lock model; "not found" is success (a retried delete whose first answer was lost)."""
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: client.delete_registered_model(lock))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _lock_tags(client: Any, lock: str) -> dict[str, str]:
    """The lock's tags; empty when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(retry(lambda: client.get_registered_model(lock)).tags or {})
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`promote`. ``outcome`` is accepted, rejected or unchanged (already champion)."""

    name: str
    outcome: str
    reason: str
    challenger_version: str
    champion_version: str | None  # the champion before the decision (None: there was none)
    metric: str
    margin: float
    clean_metric: str
    clean_tolerance: float
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    sequence: int | None = None  # this decision's number among the model's decisions (None: unchanged)

    @property
    def promoted(self) -> bool:
        return self.outcome == "accepted"

    @property
    def champion(self) -> str:
        """The version holding ``champion`` after the decision."""
        return self.challenger_version if self.promoted or self.champion_version is None else self.champion_version

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "promoted": self.promoted, "champion": self.champion}


def version_metrics(client: Any, version: Any) -> dict[str, float]:
    """A version's metrics: its run's latest values, overridden by the ``dad.metric.*`` tags set at registration.

    A deleted or unreadable run only loses the run's part: the tags still answer.
    """
    from mlflow.exceptions import MlflowException

    metrics: dict[str, float] = {}
    if getattr(version, "run_id", None):
        try:
            metrics.update(retry(lambda: client.get_run(version.run_id)).data.metrics)
        except MlflowException as err:
            _logger.warning("run %s of version %s: %s; using its tags", version.run_id, version.version, err)
    for key, value in (version.tags or {}).items():
        if key.startswith(METRIC_TAG):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG) :]] = float(value)
    return metrics


def gate_outcome(challenger: Mapping[str, float], champion: Mapping[str, float], gate: Gate) -> tuple[str, str]:
    """``("accepted" | "rejected", reason)`` of ``gate`` for two versions' metrics (both higher-is-better)."""
    metric, margin, clean_metric, clean_tolerance = gate.metric, gate.margin, gate.clean_metric, gate.clean_tolerance
    missing = [
        f"{who} has no {key!r}"
        for who, values in (("challenger", challenger), ("champion", champion))
        for key in (metric, clean_metric)
        if key not in values
    ]
    if missing:
        return "rejected", "cannot compare: " + "; ".join(missing)
    gain = challenger[metric] - champion[metric]
    drop = champion[clean_metric] - challenger[clean_metric]
    if gain < margin - 1e-12:
        return "rejected", f"{metric} gain {gain:+.4f} is below the margin {margin:g}"
    if drop > clean_tolerance + 1e-12:
        return "rejected", f"{clean_metric} drops by {drop:.4f}, more than the tolerance {clean_tolerance:g}"
    return "accepted", (
        f"{metric} gain {gain:+.4f} >= margin {margin:g}; "
        f"{clean_metric} change {-drop:+.4f} within tolerance {clean_tolerance:g}"
    )


def _decide(client: Any, name: str, version: str, gate: Gate) -> PromotionDecision:
    """Gate ``version`` against the current champion, move ``champion`` if it wins, record the decision as tags.

    Must run under :func:`_promotion_lock`: the champion read here is then the one the alias still points to when
    it is moved, and the decision gets the next number in the model's ``dad.promotion_seq``.
    """
    challenger = retry(lambda: client.get_model_version(name, version))
    aliases = _aliases(client, name)
    champion = retry(lambda: client.get_model_version(name, aliases[CHAMPION])) if CHAMPION in aliases else None
    challenger_metrics = version_metrics(client, challenger)
    champion_metrics = version_metrics(client, champion) if champion is not None else {}
    if champion is None:
        outcome, reason = "accepted", "first champion: no version held the champion alias"
    elif str(champion.version) == str(version):
        outcome, reason = "unchanged", f"version {version} already is the champion"
    else:
        outcome, reason = gate_outcome(challenger_metrics, champion_metrics, gate)
    sequence = None
    if outcome != "unchanged":
        if outcome == "accepted":
            retry(lambda: client.set_registered_model_alias(name, CHAMPION, version))
        sequence = _next_sequence(client, name)
        _tag_decision(client, name, version, outcome, reason, champion and champion.version, sequence)
    return PromotionDecision(
        name,
        outcome,
        reason,
        str(version),
        None if champion is None else str(champion.version),
        gate.metric,
        gate.margin,
        gate.clean_metric,
        gate.clean_tolerance,
        challenger_metrics,
        champion_metrics,
        sequence,
    )


def _next_sequence(client: Any, name: str) -> int:
    """Count this decision on the registered model (under the lock, so no two decisions get one number)."""
    model = retry(lambda: client.get_registered_model(name))
    sequence = int((model.tags or {}).get(SEQUENCE_TAG, 0)) + 1
    retry(lambda: client.set_registered_model_tag(name, SEQUENCE_TAG, str(sequence)))
    return sequence


def _tag_decision(
    client: Any, name: str, version: str, outcome: str, reason: str, compared: str | None, sequence: int
) -> None:
    tags = {
        "dad.promotion": outcome,
        "dad.promotion_reason": reason,
        "dad.promotion_compared_to": str(compared or "none"),
        "dad.promotion_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        SEQUENCE_TAG: str(sequence),
    }
    for key, value in tags.items():
        retry(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v))


def promote(
    name: str,
    *,
    metric: str = "ood_mean_top1",
    margin: float = 0.0,
    clean_metric: str = "clean_top1",
    clean_tolerance: float = 1.0,
    version: str | None = None,
    tracking_uri: str | None = None,
    timeout_s: float = 10.0,
) -> PromotionDecision:
    """Move ``champion`` to the challenger when it passes the gate; record the decision as version tags.

    The challenger (``version``, default the one holding ``challenger``) wins when ``metric`` improves by at least
    ``margin`` and ``clean_metric`` drops by no more than ``clean_tolerance`` (both higher-is-better). A missing
    metric on either side rejects. With no champion yet the challenger becomes champion; when the challenger already
    is the champion nothing changes. The decision is made under the model's promotion lock, so concurrent
    promotions and registrations see and move the champion one at a time.

    Raises:
        TrackingError: the tracking server does not answer.
        RegistryError: the model does not exist, has no ``challenger`` alias, or MLflow refused a request.
    """
    import mlflow

    uri = _connect(tracking_uri, timeout_s)
    client = mlflow.MlflowClient(uri)
    gate = Gate(metric, margin, clean_metric, clean_tolerance)
    with _mlflow_errors(uri):
        aliases = _aliases(client, name)
        if version is None and CHALLENGER not in aliases:
            raise RegistryError(f"registered model {name!r} has no {CHALLENGER!r} alias: register a version first")
        with _promotion_lock(client, name):
            chosen = str(version) if version is not None else _aliases(client, name)[CHALLENGER]
            decision = _decide(client, name, chosen, gate)
    _logger.info(
        "promotion of %s version %s: %s (%s)", name, decision.challenger_version, decision.outcome, decision.reason
    )
    return decision


def format_table(decision: PromotionDecision) -> str:
    """A text table of both versions' metrics (the gate's two first, marked ``*``) and the challenger's delta."""
    champ, chall = decision.champion_metrics, decision.challenger_metrics
    gate = list(dict.fromkeys((decision.metric, decision.clean_metric)))
    keys = gate + sorted((set(champ) | set(chall)) - set(gate))
    champ_head = f"champion v{decision.champion_version}" if decision.champion_version else "champion (none)"
    rows = [("metric", champ_head, f"challenger v{decision.challenger_version}", "delta")]
    for key in keys:
        a, b = champ.get(key), chall.get(key)
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "-"
        rows.append((f"{key}{' *' if key in gate else ''}", _cell(a), _cell(b), delta))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
