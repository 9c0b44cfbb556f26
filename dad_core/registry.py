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
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dad_core.errors import DADError
from dad_core.tracking import (
    check_tracking_server,
    ensure_experiment,
    lineage_tags,
    mlflow_key,
    redact_uri,
    resolve_tracking_uri,
    retry,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_TRACKING_URI",
    "PromotionDecision",
    "RegistryError",
    "format_table",
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
    uri = resolve_tracking_uri(tracking_uri) or DEFAULT_TRACKING_URI
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
        raise FileNotFoundError(f"no student checkpoint at {checkpoint_dir} (expected meta.json and state.pt)")
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
    for package in ("torch", "torchvision", "timm", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package).split('+')[0]}")
    return pins


def _package_copy(folder: Path) -> str:
    """A copy of the ``dad_core`` sources without caches: logged as the model's code (``dad_core.student``)."""
    import dad_core

    target = folder / "dad_core"
    shutil.copytree(Path(dad_core.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:5000]


def _version_tags(meta: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, Any] | None) -> dict:
    from_meta = {f"dad.{k}": _tag_value(meta[k]) for k in _META_LINEAGE if meta.get(k) not in (None, "")}
    from_meta["dad.student"] = str(meta["model"])
    values = {f"{METRIC_TAG}{mlflow_key(k)}": repr(float(v)) for k, v in metrics.items()}
    return {**lineage_tags(), **from_meta, **values, **{str(k): str(v) for k, v in (tags or {}).items()}}


def _log_model(student: Any, size: int, info: dict[str, Any]) -> str:
    """``mlflow.pytorch.log_model`` into the active run, with signature and example; returns the model URI.

    Pickle format: the default ``pt2`` (torch.export) specializes the batch dimension of a one-image example. The
    pickle refers to ``dad_core.student.Student``, so the ``dad_core`` sources travel with the model as its code.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    example = torch.full((1, 3, size, size), 0.5)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), student(example).numpy())
    with tempfile.TemporaryDirectory() as folder:
        logged = retry(
            lambda: mlflow.pytorch.log_model(
                student,
                name="model",
                signature=signature,
                input_example=example.numpy(),
                pip_requirements=_pip_requirements(),
                code_paths=[_package_copy(Path(folder))],
                metadata=info,
                serialization_format="pickle",
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
) -> dict[str, Any]:
    """Log the student in ``checkpoint_dir`` as an MLflow model, register a new version of ``name``, set ``alias``.

    Registering the same checkpoint again makes a new version. The first version of a model (more precisely: a
    version registered while no version holds ``champion``) also becomes ``champion``.

    Args:
        checkpoint_dir: student checkpoint (``state.pt`` + ``meta.json`` with model, num_classes, image_size).
        metrics: evaluation metrics, logged to the run and written as ``dad.metric.<key>`` version tags.
        name: registered model name.
        alias: alias set on the new version (``challenger``; ``champion`` forces it live).
        tags: version tags, e.g. lineage (``dad.dvc_rev``, ``dad.pipeline_run_id``); they override the ones read
            from ``meta.json`` and the git SHA of the working folder.
        tracking_uri: MLflow URI; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
        run_id: log the model in this run (e.g. the training run) instead of a new one.
        classes: class names; default ``meta["classes"]``.
        preprocessing: what the model expects; default derived from the student (size, crop, mean/std).
        experiment: experiment of the new run when ``run_id`` is None.
        timeout_s: how long to wait for an HTTP tracking server to answer.

    Returns:
        ``{"name", "version", "run_id", "model_uri", "aliases"}``; ``model_uri`` is ``models:/<name>/<version>``.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint_dir``.
        TrackingError: the tracking server does not answer.
        RegistryError: ``alias`` is not a valid alias, or MLflow refused a request.
    """
    from dad_core.student import load_student

    if not re.fullmatch(r"[\w-]{1,255}", alias) or re.fullmatch(r"latest|v\d+", alias.lower()):
        raise RegistryError(f"alias {alias!r} is not valid: letters, digits, _ and -, not 'latest' nor v<number>")
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
    }
    values = {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    with _mlflow_errors(uri), _tracking_uri(uri):
        import mlflow

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
        aliases = _assign_aliases(mlflow.MlflowClient(uri), name, str(version), alias)
    _logger.info("registered %s version %s (%s)", name, version, ", ".join(aliases))
    return {
        "name": name,
        "version": str(version),
        "run_id": logged_run,
        "model_uri": f"models:/{name}/{version}",
        "aliases": aliases,
    }


def _assign_aliases(client: Any, name: str, version: str, alias: str) -> list[str]:
    had_champion = CHAMPION in _aliases(client, name)
    retry(lambda: client.set_registered_model_alias(name, alias, version))
    if alias == CHAMPION or had_champion:
        return [alias]
    retry(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    _tag_decision(client, name, version, "accepted", "first champion: no version held the champion alias", None)
    return [alias, CHAMPION]


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


def _gate(
    challenger: Mapping[str, float],
    champion: Mapping[str, float],
    metric: str,
    margin: float,
    clean_metric: str,
    clean_tolerance: float,
) -> tuple[str, str]:
    """``("accepted" | "rejected", reason)``: ``metric`` must gain >= ``margin``, ``clean_metric`` lose <= tolerance."""
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


def _tag_decision(client: Any, name: str, version: str, outcome: str, reason: str, compared: str | None) -> None:
    tags = {
        "dad.promotion": outcome,
        "dad.promotion_reason": reason,
        "dad.promotion_compared_to": str(compared or "none"),
        "dad.promotion_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    tracking_uri: str | None = None,
    timeout_s: float = 10.0,
) -> PromotionDecision:
    """Move ``champion`` to the ``challenger`` version when it passes the gate; record the decision as version tags.

    The challenger wins when ``metric`` improves by at least ``margin`` and ``clean_metric`` drops by no more than
    ``clean_tolerance`` (both higher-is-better). A missing metric on either side rejects. With no champion yet the
    challenger becomes champion; when the challenger already is the champion nothing changes.

    Raises:
        TrackingError: the tracking server does not answer.
        RegistryError: the model does not exist, has no ``challenger`` alias, or MLflow refused a request.
    """
    import mlflow

    uri = _connect(tracking_uri, timeout_s)
    client = mlflow.MlflowClient(uri)
    with _mlflow_errors(uri):
        aliases = _aliases(client, name)
        if CHALLENGER not in aliases:
            raise RegistryError(f"registered model {name!r} has no {CHALLENGER!r} alias: register a version first")
        challenger = retry(lambda: client.get_model_version(name, aliases[CHALLENGER]))
        champion = retry(lambda: client.get_model_version(name, aliases[CHAMPION])) if CHAMPION in aliases else None
        challenger_metrics = version_metrics(client, challenger)
        champion_metrics = version_metrics(client, champion) if champion is not None else {}
        if champion is None:
            outcome, reason = "accepted", "no champion yet: the challenger becomes the first champion"
        elif str(champion.version) == str(challenger.version):
            outcome, reason = "unchanged", f"the challenger (version {challenger.version}) already is the champion"
        else:
            outcome, reason = _gate(challenger_metrics, champion_metrics, metric, margin, clean_metric, clean_tolerance)
        if outcome == "accepted":
            retry(lambda: client.set_registered_model_alias(name, CHAMPION, challenger.version))
        if outcome != "unchanged":
            _tag_decision(client, name, challenger.version, outcome, reason, champion and champion.version)
    decision = PromotionDecision(
        name,
        outcome,
        reason,
        str(challenger.version),
        None if champion is None else str(champion.version),
        metric,
        margin,
        clean_metric,
        clean_tolerance,
        challenger_metrics,
        champion_metrics,
    )
    _logger.info("promotion of %s version %s: %s (%s)", name, decision.challenger_version, outcome, reason)
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
