"""Launch distributed DAD training: ``torchrun`` on this machine, or a Kubeflow Trainer job on Kubernetes.

The ``train_student`` component makes one call, :func:`launch_training`. Both backends keep the one distributed
contract of this project, the torchrun environment (STYLE E30):

* ``local`` runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m dad_core.cli.train ...`` as
  a child process (plain ``python -m`` when N is 1), streams its output line by line, and puts the last lines
  into the error when it fails.
* ``kubernetes`` creates a Kubeflow Trainer v2.3 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, the default) or a
  legacy Training Operator ``PyTorchJob`` (``kubeflow.org/v1``) whose pods run ``torchrun -m dad_core.cli.train``.
  The job name comes from the pipeline run (:func:`job_name`), so a restarted launcher re-attaches to its job
  instead of starting a second one. The launcher streams the rank-0 log, stops and deletes the job on timeout,
  and on failure raises with the failing pod's last log lines. A launcher that is killed (pod preempted, task
  retried) leaves its job running, bounded by ``activeDeadlineSeconds``; the next launcher re-attaches to it, and
  replaces it only if it had already failed.

Job bodies are built by pure functions over a frozen :class:`JobSpec` and checked against the APIs' own model
types (``kubeflow-trainer-api``, ``kubeflow-training``) before anything is sent. ``kubernetes`` and those packages
are imported inside the functions that use them: importing this module needs neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from dad_core.errors import DADError

__all__ = [
    "DEFAULT_MODULE",
    "DEFAULT_NAMESPACE",
    "DEFAULT_RUNTIME",
    "JobSpec",
    "LaunchError",
    "LaunchResult",
    "RetryPolicy",
    "build_job",
    "build_pytorchjob",
    "build_trainjob",
    "check_job_name",
    "job_name",
    "launch_training",
    "local_command",
    "run_kubernetes_job",
    "run_local",
    "validate_job_body",
]

_logger = logging.getLogger(__name__)

DEFAULT_MODULE = "dad_core.cli.train"
DEFAULT_RUNTIME = "dad-torch-distributed"  # the ClusterTrainingRuntime installed by k8s/
DEFAULT_NAMESPACE = "dad"
PATCH_MANAGER = "dad-on-kubeflow/launcher"  # owner of our entry in TrainJob.spec.runtimePatches
CLEANUP_POLICIES = ("always", "on_success", "never")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
_REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds per API call: a hung connection must not hang the launcher
_ISTIO_OFF = {"sidecar.istio.io/inject": "false"}  # a sidecar never exits, so the job would never complete


class LaunchError(DADError):
    """Training could not be started, failed, timed out, or the cluster refused the job; the message says why."""


@dataclass(frozen=True)
class LaunchResult:
    """What a finished launch did."""

    backend: str
    duration_s: float
    job_name: str | None = None  # kubernetes only
    job_kind: str | None = None  # "TrainJob" or "PyTorchJob"
    reattached: bool = False  # True when an existing job (same run, same task) was watched instead of created
    log_tail: tuple[str, ...] = ()  # the last lines of output (local) or of the rank-0 log (kubernetes)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for Kubernetes API calls that fail transiently (HTTP 429/5xx, connection errors)."""

    attempts: int = 6
    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0


@dataclass(frozen=True)
class JobSpec:
    """Where and how one distributed training job runs on Kubernetes. Both job kinds are built from it."""

    name: str  # RFC 1035 label, at most 63 characters: see job_name()
    image: str  # the project image (components/_image.py: DAD_IMAGE)
    namespace: str = DEFAULT_NAMESPACE
    train_args: tuple[str, ...] = ()  # arguments after `torchrun -m <module>`
    module: str = DEFAULT_MODULE
    num_nodes: int = 1
    nproc_per_node: int = 1  # processes per node; one per GPU on GPU nodes
    gpus_per_node: int = 0  # nvidia.com/gpu limit per node; 0 means CPU only
    cpu: str | None = None  # CPU limit per node, e.g. "8" (requests default to limits)
    memory: str | None = None  # memory limit per node, e.g. "64Gi"
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # VAR -> (secret name, key)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()  # Kubernetes toleration objects
    pvc_mounts: Mapping[str, str] = field(default_factory=dict)  # PVC claim name -> mount path
    shm_size: str | None = None  # memory-backed /dev/shm of this size, for DataLoader workers and NCCL
    service_account: str | None = None
    runtime: str = DEFAULT_RUNTIME  # TrainJob only: the training runtime to run on
    runtime_kind: str = "ClusterTrainingRuntime"  # TrainJob only: or "TrainingRuntime" (namespaced)
    timeout_s: int | None = None  # activeDeadlineSeconds: the cluster stops the job even if the launcher is gone
    backoff_limit: int = 0  # PyTorchJob only: pod restarts before the job fails
    labels: Mapping[str, str] = field(default_factory=dict)  # on the job object
    pod_annotations: Mapping[str, str] = field(default_factory=lambda: dict(_ISTIO_OFF))

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_args", tuple(self.train_args))
        object.__setattr__(self, "tolerations", tuple(self.tolerations))
        check_job_name(self.name)
        if not self.image:
            raise LaunchError("JobSpec.image is empty: set it to the project image (components/_image.py)")
        for key, low in (("num_nodes", 1), ("nproc_per_node", 1), ("gpus_per_node", 0), ("backoff_limit", 0)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise LaunchError(f"JobSpec.{key} must be an integer >= {low}, got {getattr(self, key)!r}")
        if self.timeout_s is not None and self.timeout_s < 1:
            raise LaunchError(f"JobSpec.timeout_s must be >= 1 second, got {self.timeout_s!r}")
        reserved = sorted(k for k in [*self.env, *self.secret_env] if k.startswith("PET_"))
        if reserved:
            raise LaunchError(f"JobSpec env {reserved} use the PET_ prefix that Kubeflow Trainer reserves for torchrun")
        bad = sorted(path for path in self.pvc_mounts.values() if not str(path).startswith("/"))
        if bad:
            raise LaunchError(f"JobSpec.pvc_mounts paths must be absolute, got {bad}")
        bad = sorted(claim for claim in self.pvc_mounts if len(claim) > 63 or not _DNS1123.match(claim))
        if bad:  # each claim also names its pod volume, and volume names are DNS-1123 labels
            raise LaunchError(f"JobSpec.pvc_mounts claim names must be DNS-1123 labels, got {bad}")


@dataclass(frozen=True)
class _Kind:
    """One job API: where it lives, which condition means done, how its pods are labelled."""

    kind: str
    group: str
    version: str
    plural: str
    succeeded: str  # the status condition type of a job that finished well
    container: str  # the training container in each pod
    job_label: str  # pod label holding the job name
    rank0_labels: Mapping[str, str]  # extra pod labels that pick node 0 / the master
    install_hint: str


_KINDS = {
    "trainjob": _Kind(
        kind="TrainJob",
        group="trainer.kubeflow.org",
        version="v1alpha1",
        plural="trainjobs",
        succeeded="Complete",
        container="node",
        job_label="jobset.sigs.k8s.io/jobset-name",
        # Trainer runs the nodes as completion indexes of the first Job of the JobSet's "node" replicated job.
        rank0_labels={
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-completion-index": "0",
        },
        install_hint="install Kubeflow Trainer v2.3 (trainer.kubeflow.org/v1alpha1) and its training runtime, "
        "or launch with job_kind='pytorchjob' on a cluster with the Training Operator v1.9",
    ),
    "pytorchjob": _Kind(
        kind="PyTorchJob",
        group="kubeflow.org",
        version="v1",
        plural="pytorchjobs",
        succeeded="Succeeded",
        container="pytorch",
        job_label="training.kubeflow.org/job-name",
        rank0_labels={"training.kubeflow.org/replica-type": "master", "training.kubeflow.org/replica-index": "0"},
        install_hint="install the Kubeflow Training Operator v1.9 (kubeflow.org/v1), or launch with "
        "job_kind='trainjob'",
    ),
}


# --------------------------------------------------------------------------------------------------- names


def check_job_name(name: str) -> str:
    """Return ``name`` if it is a valid job name, else raise.

    TrainJob names must be RFC 1035 labels of at most 63 characters (the CRD's own rule); PyTorchJob accepts the
    same, so one rule serves both.

    Raises:
        LaunchError: the name is too long or has characters Kubernetes rejects.
    """
    if not isinstance(name, str) or len(name) > 63 or not _DNS1035.match(name):
        raise LaunchError(
            f"job name {name!r} is not a valid RFC 1035 label: at most 63 lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return name


def job_name(run_id: str, task_name: str = "train-student", prefix: str = "dad-train") -> str:
    """A job name that is the same every time one pipeline run launches one task: ``<prefix>-<10 hex>``.

    A launcher that restarts (pod preempted, task retried) computes the same name and re-attaches to its job.

    Args:
        run_id: the pipeline run (job) id, e.g. KFP's ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``.
        task_name: the task within the run, e.g. ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``.
        prefix: readable start of the name.

    Returns:
        The job name.

    Raises:
        LaunchError: ``run_id`` is empty or ``prefix`` makes an invalid name.
    """
    if not run_id:
        raise LaunchError("job_name() needs the pipeline run id: without it a restarted launcher cannot find its job")
    digest = hashlib.sha256(f"{run_id}\0{task_name}".encode()).hexdigest()[:10]
    return check_job_name(f"{prefix}-{digest}")


# --------------------------------------------------------------------------------------------------- bodies


def _resources(spec: JobSpec) -> dict[str, Any]:
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    limits = {key: str(value) for key, value in limits.items() if value}
    return {"limits": limits} if limits else {}


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": name, "value": str(value)} for name, value in spec.env.items()]
    for name, (secret, key) in spec.secret_env.items():
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _volumes(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and the training container's mounts: each PVC, plus /dev/shm when ``shm_size`` is set."""
    volumes = [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in spec.pvc_mounts]
    mounts = [{"name": claim, "mountPath": path} for claim, path in spec.pvc_mounts.items()]
    if spec.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _pod_spec_fields(spec: JobSpec) -> dict[str, Any]:
    """The pod-level settings both kinds share (all of them allowed in a Trainer v2.3 runtime patch)."""
    volumes, _ = _volumes(spec)
    fields = {
        "serviceAccountName": spec.service_account,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [dict(toleration) for toleration in spec.tolerations],
        "volumes": volumes,
    }
    return {key: value for key, value in fields.items() if value}


def _metadata(spec: JobSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace}
    if spec.labels:
        meta["labels"] = dict(spec.labels)
    return meta


def _command(spec: JobSpec) -> list[str]:
    # torchrun turns the PET_* variables both operators inject into MASTER_ADDR/RANK/WORLD_SIZE for each worker.
    return ["torchrun", "-m", spec.module, *spec.train_args]


def _trainjob_patch(spec: JobSpec) -> dict[str, Any] | None:
    """Our ``runtimePatches`` entry: pod settings and volume mounts of the runtime's ``node`` replicated job."""
    pod = _pod_spec_fields(spec)
    _, mounts = _volumes(spec)
    if mounts:
        pod["containers"] = [{"name": "node", "volumeMounts": mounts}]
    template: dict[str, Any] = {"spec": pod} if pod else {}
    if spec.pod_annotations:
        template["metadata"] = {"annotations": dict(spec.pod_annotations)}
    if not template:
        return None
    node = {"name": "node", "template": {"spec": {"template": template}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}


def build_trainjob(spec: JobSpec) -> dict[str, Any]:
    """The Kubeflow Trainer v2.3 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) for ``spec``.

    Container settings go in ``spec.trainer`` (the only place Trainer lets env and resources of the ``node``
    container be set); pod settings (service account, node selector, tolerations, volumes and mounts,
    annotations) go in one ``runtimePatches`` entry owned by :data:`PATCH_MANAGER`.

    Returns:
        The body as plain JSON-ready dicts.
    """
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": _command(spec),
        "numNodes": spec.num_nodes,
        "numProcPerNode": spec.nproc_per_node,
    }
    if resources := _resources(spec):
        trainer["resourcesPerNode"] = resources
    if env := _env(spec):
        trainer["env"] = env
    kind = _KINDS["trainjob"]
    body_spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": kind.group, "kind": spec.runtime_kind, "name": spec.runtime},
        "trainer": trainer,
    }
    if spec.timeout_s:
        body_spec["activeDeadlineSeconds"] = spec.timeout_s
    if patch := _trainjob_patch(spec):
        body_spec["runtimePatches"] = [patch]
    return {
        "apiVersion": f"{kind.group}/{kind.version}",
        "kind": kind.kind,
        "metadata": _metadata(spec),
        "spec": body_spec,
    }


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """The legacy Training Operator v1.9 ``PyTorchJob`` (``kubeflow.org/v1``) for ``spec``.

    One ``Master`` replica plus ``num_nodes - 1`` ``Worker`` replicas, ``restartPolicy: Never`` so a failed pod
    keeps its log, and ``cleanPodPolicy: None`` so the launcher can read it before cleaning up.

    Returns:
        The body as plain JSON-ready dicts.
    """
    _, mounts = _volumes(spec)
    container: dict[str, Any] = {"name": "pytorch", "image": spec.image, "command": _command(spec)}
    for key, value in (("resources", _resources(spec)), ("env", _env(spec)), ("volumeMounts", mounts)):
        if value:
            container[key] = value
    template: dict[str, Any] = {"spec": {**_pod_spec_fields(spec), "containers": [container]}}
    if spec.pod_annotations:
        template["metadata"] = {"annotations": dict(spec.pod_annotations)}
    replicas = {"Master": 1, "Worker": spec.num_nodes - 1}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit}
    if spec.timeout_s:
        run_policy["activeDeadlineSeconds"] = spec.timeout_s
    kind = _KINDS["pytorchjob"]
    return {
        "apiVersion": f"{kind.group}/{kind.version}",
        "kind": kind.kind,
        "metadata": _metadata(spec),
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                role: {"replicas": count, "restartPolicy": "Never", "template": template}
                for role, count in replicas.items()
                if count
            },
        },
    }


def build_job(spec: JobSpec, kind: str = "trainjob") -> dict[str, Any]:
    """:func:`build_trainjob` or :func:`build_pytorchjob`, by ``kind`` (``"trainjob"`` or ``"pytorchjob"``)."""
    return build_trainjob(spec) if _job_kind(kind).kind == "TrainJob" else build_pytorchjob(spec)


def _job_kind(kind: str) -> _Kind:
    if kind not in _KINDS:
        raise LaunchError(f"unknown job_kind {kind!r}: expected one of {sorted(_KINDS)}")
    return _KINDS[kind]


# --------------------------------------------------------------------------------------------------- validation


def _diff(expected: Any, got: Any, path: str = "") -> list[str]:
    """Paths where ``got`` differs from ``expected``: a field the model dropped or a value it coerced."""
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        return [
            p
            for key in sorted({*expected, *got}, key=str)
            for p in _diff(expected.get(key), got.get(key), f"{path}.{key}" if path else str(key))
        ]
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        return [p for i, (a, b) in enumerate(zip(expected, got)) for p in _diff(a, b, f"{path}[{i}]")]
    if expected == got and type(expected) is type(got):
        return []
    if got is None:
        return [f"{path} (not a field of the model)"]
    return [f"{path or '<root>'} (sent {expected!r}, the model reads {got!r})"]


def _check_round_trip(body: Mapping[str, Any], parsed: Mapping[str, Any], what: str) -> None:
    # The generated models ignore unknown keys and coerce some types; a body must survive a round trip unchanged.
    problems = _diff(json.loads(json.dumps(body)), parsed)
    if problems:
        raise LaunchError(f"{what} body has unknown or mistyped fields: " + "; ".join(problems[:5]))


def _validate_trainjob(body: Mapping[str, Any]) -> None:
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        model = TrainerV1alpha1TrainJob.from_dict(dict(body))
    except (ValidationError, ValueError, TypeError, AttributeError) as err:
        raise LaunchError(f"TrainJob body does not match trainer.kubeflow.org/v1alpha1 (Trainer v2.3): {err}") from err
    _check_round_trip(body, model.to_dict(), "TrainJob")


def _validate_pytorchjob(body: Mapping[str, Any]) -> None:
    from kubeflow.training import ApiClient  # the Training SDK's client: it resolves the KubeflowOrgV1* models

    client = ApiClient()
    response = SimpleNamespace(data=json.dumps(body))  # deserialize() reads an HTTP response's .data
    try:
        model = client.deserialize(response, "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError, AttributeError) as err:
        raise LaunchError(f"PyTorchJob body does not match kubeflow.org/v1 (Training Operator v1.9): {err}") from err
    _check_round_trip(body, client.sanitize_for_serialization(model), "PyTorchJob")


def validate_job_body(body: Mapping[str, Any]) -> None:
    """Check a ``TrainJob`` or ``PyTorchJob`` body against the API's own generated model types.

    Parsing catches missing required fields and wrong types; a round trip back to JSON catches fields the model
    does not know (which it would drop silently) and values it had to coerce (``"2"`` for an integer).

    Raises:
        LaunchError: the body is not valid for its kind, or the kind is not one of the two.
    """
    validators = {"TrainJob": _validate_trainjob, "PyTorchJob": _validate_pytorchjob}
    kind = body.get("kind")
    if kind not in validators:
        raise LaunchError(f"cannot validate a job of kind {kind!r}: expected TrainJob or PyTorchJob")
    validators[kind](body)


# --------------------------------------------------------------------------------------------------- local


def _shown(cmd: Sequence[str]) -> str:
    """``cmd`` for a log line, any URI credentials (``-p tracking.uri=http://u:p@h``) shown as ``***``."""
    from dad_core.config import redact_uri

    def redact(arg: str) -> str:
        key, sep, value = arg.rpartition("=") if "://" in arg.partition("=")[2] else ("", "", arg)
        return f"{key}{sep}{redact_uri(value)}"

    return shlex.join(redact(arg) for arg in cmd)


def local_command(train_args: Sequence[str], *, nproc_per_node: int = 1, module: str = DEFAULT_MODULE) -> list[str]:
    """The command the local backend runs.

    One process runs ``python -u -m <module>`` directly: with no torchrun variables set, ``dad_core.distributed``
    treats it as a single process, and it saves torchrun's start-up. More processes run under
    ``python -m torch.distributed.run --standalone`` (the venv's torchrun), which starts its workers with ``-u``.

    Returns:
        The argv list.

    Raises:
        LaunchError: ``nproc_per_node`` is below 1.
    """
    if nproc_per_node < 1:
        raise LaunchError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nproc_per_node == 1:
        return [sys.executable, "-u", "-m", module, *train_args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        module,
        *train_args,
    ]


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group (torchrun and its workers), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _without_launcher_traceback(lines: Sequence[str]) -> list[str]:
    """Drop torchrun's own traceback (``ChildFailedError`` raised inside ``torch.distributed.run``).

    It says nothing about the failure and would push the worker's message out of the tail; the failure summary
    torchrun prints after it (rank, exit code) is kept.
    """
    lines = list(lines)
    end = next((i for i in range(len(lines) - 1, -1, -1) if "errors.ChildFailedError" in lines[i]), None)
    if end is None:
        return lines
    start = next((i for i in range(end, -1, -1) if lines[i].startswith("Traceback (most recent call last)")), end)
    return [*lines[:start], *lines[end + 1 :]]


def _echo_stdout(line: str) -> None:
    # The child's output is passed through as-is (it is the training log), not re-logged with our own prefix.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_local(
    train_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    module: str = DEFAULT_MODULE,
    timeout_s: float | None = None,
    echo: Callable[[str], None] | None = None,
    tail_lines: int = 40,
) -> LaunchResult:
    """Run training on this machine (see :func:`local_command`) and stream its output.

    Args:
        train_args: arguments for the training module.
        nproc_per_node: processes to start.
        module: the module to run (``python -m``).
        timeout_s: stop the whole process group after this many seconds.
        echo: called with each output line; default: this process's stdout.
        tail_lines: how many of the last lines to keep for the error message and the result.

    Returns:
        The result, with the last output lines.

    Raises:
        LaunchError: the command exited non-zero or timed out; the message holds the last output lines.
    """
    cmd = local_command(train_args, nproc_per_node=nproc_per_node, module=module)
    echo = echo or _echo_stdout
    tail: deque[str] = deque(maxlen=tail_lines + 40)  # room for torchrun's traceback, dropped below
    timed_out = threading.Event()
    _logger.info("launching: %s", _shown(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    timer = threading.Timer(timeout_s, lambda: (timed_out.set(), _stop_process_group(proc))) if timeout_s else None
    try:
        if timer is not None:
            timer.start()
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            echo(tail[-1])
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:  # interrupted while reading: take the workers down with us
            _stop_process_group(proc)
    last_lines = _without_launcher_traceback(tail)[-tail_lines:]
    last = "\n".join(last_lines)
    if timed_out.is_set():
        raise LaunchError(f"local training timed out after {timeout_s:g}s and was stopped; last lines:\n{last}")
    if code != 0:
        raise LaunchError(f"local training failed with exit code {code} ({_shown(cmd)}); last lines:\n{last}")
    return LaunchResult(backend="local", duration_s=time.monotonic() - start, log_tail=tuple(last_lines))


# --------------------------------------------------------------------------------------------------- kubernetes


def _default_api_client() -> Any:
    """An ``ApiClient`` from the pod's service account, else from the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError, TypeError) as err:
            raise LaunchError(
                "no Kubernetes credentials: this is not a pod with a service account token, and no usable "
                f"kubeconfig was found (~/.kube/config or $KUBECONFIG): {err}"
            ) from err
    return client.ApiClient()


def _api_message(err: Any) -> str:
    """The ``message`` of a Kubernetes ``Status`` error body, else the HTTP reason."""
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)


class _Api:
    """The few API calls the launcher makes, with retries on transient errors."""

    def __init__(self, api_client: Any, kind: _Kind, namespace: str, retry: RetryPolicy) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.kind, self.namespace, self.retry = kind, namespace, retry

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried with exponential backoff on HTTP 429/5xx and connection errors.

        Raises:
            LaunchError: still failing after ``retry.attempts`` tries.
            kubernetes.client.ApiException: a non-transient HTTP error (the caller decides what it means).
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        delay = self.retry.initial_delay_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn(*args, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
            except ApiException as err:
                if err.status not in _TRANSIENT_HTTP:
                    raise
                error = f"HTTP {err.status} {_api_message(err)}"
            except HTTPError as err:  # connection refused or reset, read timeout
                error = f"{type(err).__name__}: {err}"
            if attempt == self.retry.attempts:
                raise LaunchError(
                    f"Kubernetes API call to {what} failed {attempt} times, giving up; last error: "
                    f"{error}. Check that the API server is reachable from here."
                )
            _logger.warning("Kubernetes API call to %s failed (%s); retry %d in %.1fs", what, error, attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.retry.max_delay_s)
        raise AssertionError("unreachable")

    def _path(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def create(self, body: Mapping[str, Any]) -> Any:
        return self.call(f"create {self.kind.kind}", self.custom.create_namespaced_custom_object, *self._path(), body)

    def get(self, name: str) -> dict[str, Any]:
        return self.call(f"get {self.kind.kind} {name}", self.custom.get_namespaced_custom_object, *self._path(), name)

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:  # Foreground: the job's JobSet/pods go before the job itself, so the name is free once it is gone
            self.call(
                f"delete {self.kind.kind} {name}",
                self.custom.delete_namespaced_custom_object,
                *self._path(),
                name,
                propagation_policy="Foreground",
            )
        except ApiException as err:
            if err.status != 404:
                where = f"{self.kind.kind} {self.namespace}/{name}"
                raise LaunchError(f"cannot delete {where}: {_api_message(err)}") from err

    def pods(self, labels: Mapping[str, str]) -> list[Any]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = self.call("list pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        # Re-checked here too, so a server that ignores the selector can never hand us another job's pod.
        return [pod for pod in found.items if labels.items() <= dict(pod.metadata.labels or {}).items()]

    def log(self, pod: str, **kwargs: Any) -> str:
        # Raw bytes: the client would otherwise json.loads() a log that happens to be valid JSON.
        response = self.core.read_namespaced_pod_log(
            pod,
            self.namespace,
            container=self.kind.container,
            _preload_content=False,
            _request_timeout=_REQUEST_TIMEOUT,
            **kwargs,
        )
        return response.data.decode("utf-8", "replace")


def _ts_key(stamp: str) -> tuple[str, int] | None:
    """Sortable key of an RFC 3339 timestamp with optional nanoseconds (``2026-01-02T03:04:05.123Z``)."""
    base, _, frac = stamp.rstrip("Z").partition(".")
    if "T" not in base or (frac and not frac.isdigit()):
        return None
    return base, int((frac or "0").ljust(9, "0")[:9])


class _LogFollower:
    """Streams the rank-0 pod's log by polling it with timestamps and echoing each new line once.

    Polling (not ``follow=True``) keeps the launcher's loop in one thread and survives pod restarts and
    dropped connections: each poll asks for the lines since the last one, and timestamps drop repeats.
    Reading logs is best effort: a failure is logged at debug level and tried again on the next poll.
    """

    def __init__(self, api: _Api, job: str, echo: Callable[[str], None], first_tail: int = 200) -> None:
        self.api, self.echo, self.first_tail = api, echo, first_tail
        self.labels = {api.kind.job_label: job, **api.kind.rank0_labels}
        self.pod: str | None = None
        self.last_key: tuple[str, int] | None = None
        self.last_read: float | None = None
        self.tail: deque[str] = deque(maxlen=first_tail)

    def poll(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            pods = self.api.pods(self.labels)
            if not pods:
                return
            # The newest pod: a restarted node gets a new pod, and the old one may linger for a while.
            newest = max(pods, key=lambda pod: str(pod.metadata.creation_timestamp or "")).metadata.name
            if newest != self.pod:
                self.pod, self.last_read = newest, None
            window = (
                {"tail_lines": self.first_tail}
                if self.last_read is None
                else {"since_seconds": math.ceil(time.monotonic() - self.last_read) + 10}
            )
            text = self.api.log(self.pod, timestamps=True, **window)
        except (ApiException, HTTPError, LaunchError) as err:  # container not started yet, or an API hiccup
            _logger.debug("no log from the rank-0 pod yet: %s", err)
            return
        self.last_read = time.monotonic()
        self._emit(text)

    def _emit(self, text: str) -> None:
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            key = _ts_key(stamp)
            if key is None:
                key, message = self.last_key, line
            elif self.last_key is not None and key <= self.last_key:
                continue
            self.last_key = key
            self.tail.append(message)
            self.echo(message)


def _terminal_state(job: Mapping[str, Any], kind: _Kind) -> tuple[str, str] | None:
    """``(condition type, "reason: message")`` once the job succeeded or failed, else ``None``."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in (kind.succeeded, "Failed") and condition.get("status") == "True":
            detail = ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)
            return condition["type"], detail
    return None


def _create_or_attach(api: _Api, body: Mapping[str, Any]) -> bool:
    """Create the job; if it exists already (same run and task), attach to it. Returns True when re-attached.

    A job that exists and has already failed is a retry of a failed task: it is deleted and created again.
    """
    from kubernetes.client.exceptions import ApiException

    name, kind = body["metadata"]["name"], api.kind
    where = f"{kind.kind} {api.namespace}/{name}"
    try:
        api.create(body)
        _logger.info("created %s", where)
        return False
    except ApiException as err:
        if err.status == 404:
            raise _not_found_error(api, err) from None
        if err.status == 403:
            raise LaunchError(
                f"not allowed to create {where}: {_api_message(err)}. The service account needs "
                f"create/get/list/watch/delete on {kind.plural}.{kind.group} and get/list on pods "
                "and pods/log in that namespace."
            ) from None
        if err.status != 409:
            raise LaunchError(f"the cluster refused {where}: HTTP {err.status}: {_api_message(err)}") from None
    state = _terminal_state(api.get(name), kind)
    if state is not None and state[0] == "Failed":
        _logger.warning("%s exists and has failed (%s); deleting it and starting again", where, state[1])
        api.delete(name)
        _wait_gone(api, name)
        api.create(body)
        return False
    _logger.info("%s exists already: re-attaching to it", where)
    return True


def _not_found_error(api: _Api, err: Any) -> LaunchError:
    try:
        missing = (json.loads(err.body).get("details") or {}).get("kind")
    except (TypeError, ValueError, AttributeError):
        missing = None
    if missing == "namespaces":
        return LaunchError(f"namespace {api.namespace!r} does not exist on the cluster: create it (k8s/) first")
    kind = api.kind
    return LaunchError(
        f"{kind.kind} CRD not found on the cluster ({kind.plural}.{kind.group}/{kind.version} "
        f"returned 404): {kind.install_hint}"
    )


def _wait_gone(api: _Api, name: str, timeout_s: float = 300.0, interval_s: float = 2.0) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            api.get(name)
        except ApiException as err:
            if err.status == 404:
                return
            raise
        time.sleep(interval_s)
    raise LaunchError(f"{api.kind.kind} {api.namespace}/{name} is still being deleted after {timeout_s:g}s")


def _watch(api: _Api, name: str, logs: _LogFollower, poll_interval_s: float, deadline: float) -> tuple[str, str]:
    """Poll the job (and its rank-0 log) until it succeeds or fails; ``("Timeout", "")`` past ``deadline``."""
    from kubernetes.client.exceptions import ApiException

    while True:
        try:
            job = api.get(name)
        except ApiException as err:
            raise LaunchError(
                f"{api.kind.kind} {api.namespace}/{name} vanished while being watched "
                f"(HTTP {err.status}: {_api_message(err)}); was it deleted by someone?"
            ) from None
        logs.poll()
        state = _terminal_state(job, api.kind)
        if state is not None:
            return state
        now = time.monotonic()
        if now >= deadline:
            return "Timeout", ""
        time.sleep(min(poll_interval_s, deadline - now))


def _pod_failed(pod: Any) -> bool:
    status = pod.status
    if status is None:
        return False
    if status.phase == "Failed":
        return True
    for container in status.container_statuses or []:
        for state in (container.state, container.last_state):
            if state is not None and state.terminated is not None and state.terminated.exit_code:
                return True
    return False


def _restarted_after_crash(pod: Any) -> bool:
    """The container crashed and runs again: the crash is in the log of its previous instance."""
    for container in (pod.status.container_statuses if pod.status else None) or []:
        crashed = container.last_state and container.last_state.terminated
        if crashed and crashed.exit_code and not (container.state and container.state.terminated):
            return True
    return False


def _failure_logs(api: _Api, name: str, tail_lines: int) -> str:
    """The last log lines of the pod that failed (rank 0 first), or of rank 0 when none is marked failed."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        pods = api.pods({api.kind.job_label: name})
    except (ApiException, LaunchError) as err:
        return f"(pods could not be listed: {err})"
    rank0 = {pod.metadata.name for pod in pods if api.kind.rank0_labels.items() <= (pod.metadata.labels or {}).items()}
    ordered = sorted(pods, key=lambda pod: (not _pod_failed(pod), pod.metadata.name not in rank0, pod.metadata.name))
    if not ordered:
        return "(no pods found for the job)"
    pod = ordered[0].metadata.name
    try:
        text = api.log(pod, tail_lines=tail_lines, previous=_restarted_after_crash(ordered[0]))
    except (ApiException, HTTPError) as err:
        return f"(log of pod {pod} unavailable: {err})"
    return f"last {tail_lines} log lines of pod {pod}:\n{text.rstrip()}"


def run_kubernetes_job(
    spec: JobSpec,
    *,
    kind: str = "trainjob",
    cleanup: str = "on_success",
    poll_interval_s: float = 10.0,
    api_client: Any | None = None,
    echo: Callable[[str], None] | None = None,
    retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing the default is safe
    tail_lines: int = 40,
) -> LaunchResult:
    """Create (or re-attach to) a training job, stream its rank-0 log, and wait until it ends.

    Args:
        spec: the job; its ``timeout_s`` is also the launcher's own deadline.
        kind: ``"trainjob"`` (Kubeflow Trainer v2.3) or ``"pytorchjob"`` (Training Operator v1.9).
        cleanup: delete the job ``"always"``, ``"on_success"`` (keep failures for inspection) or ``"never"``.
            A timed-out job is always deleted.
        poll_interval_s: seconds between status (and log) polls.
        api_client: a ``kubernetes.client.ApiClient``; default: in-cluster config, else the kubeconfig.
        echo: called with each rank-0 log line; default: this process's stdout.
        retry: backoff for transient API errors.
        tail_lines: log lines of the failing pod to put into the error.

    Returns:
        The result; ``reattached`` tells whether the job already existed.

    Raises:
        LaunchError: invalid body, missing CRD or permissions, job failed (with the failing pod's last log lines),
            timed out (the job is deleted), or the API stayed unreachable.
    """
    job_kind = _job_kind(kind)
    if cleanup not in CLEANUP_POLICIES:
        raise LaunchError(f"unknown cleanup policy {cleanup!r}: expected one of {CLEANUP_POLICIES}")
    body = build_job(spec, kind)
    validate_job_body(body)
    api = _Api(api_client if api_client is not None else _default_api_client(), job_kind, spec.namespace, retry)
    where = f"{job_kind.kind} {spec.namespace}/{spec.name}"
    start = time.monotonic()
    reattached = _create_or_attach(api, body)
    logs = _LogFollower(api, spec.name, echo or _echo_stdout)
    deadline = start + spec.timeout_s if spec.timeout_s else math.inf
    state, detail = _watch(api, spec.name, logs, poll_interval_s, deadline)
    if state == "Timeout":
        api.delete(spec.name)
        raise LaunchError(
            f"{where} timed out after {spec.timeout_s}s and was deleted; "
            f"last rank-0 lines:\n" + "\n".join(list(logs.tail)[-tail_lines:])
        )
    if state == "Failed":
        failure = _failure_logs(api, spec.name, tail_lines)
        if failure.startswith("(") and logs.tail:  # pods already gone: fall back to what we streamed
            failure += "; last rank-0 lines streamed:\n" + "\n".join(list(logs.tail)[-tail_lines:])
        if cleanup == "always":
            api.delete(spec.name)
        raise LaunchError(f"{where} failed ({detail or 'no reason given'}); {failure}")
    if cleanup != "never":
        api.delete(spec.name)
    _logger.info("%s finished: %s", where, detail or state)
    return LaunchResult(
        backend="kubernetes",
        duration_s=time.monotonic() - start,
        job_name=spec.name,
        job_kind=job_kind.kind,
        reattached=reattached,
        log_tail=tuple(logs.tail)[-tail_lines:],
    )


# --------------------------------------------------------------------------------------------------- entry point


def launch_training(
    *,
    backend: str,
    train_args: Sequence[str],
    nproc_per_node: int = 1,
    module: str = DEFAULT_MODULE,
    timeout_s: float | None = None,
    job: JobSpec | None = None,
    job_kind: str = "trainjob",
    cleanup: str = "on_success",
    poll_interval_s: float = 10.0,
    api_client: Any | None = None,
    echo: Callable[[str], None] | None = None,
) -> LaunchResult:
    """Run distributed training on the chosen backend and return when it has finished well.

    The same ``train_args``, ``nproc_per_node``, ``module`` and ``timeout_s`` mean the same on both backends; on
    ``kubernetes`` they replace the corresponding fields of ``job``, which says where and how the job runs.

    Args:
        backend: ``"local"`` (torchrun on this machine) or ``"kubernetes"`` (a Kubeflow Trainer job).
        train_args: arguments for the training module.
        nproc_per_node: processes per node (per machine locally).
        module: the training module run with ``-m``.
        timeout_s: stop (and on Kubernetes delete) the training after this many seconds.
        job: the Kubernetes job: name, namespace, image, nodes, resources, volumes. Required on ``kubernetes``.
        job_kind: ``"trainjob"`` or ``"pytorchjob"`` (kubernetes only).
        cleanup: ``"always"``, ``"on_success"`` or ``"never"`` (kubernetes only).
        poll_interval_s: seconds between status polls (kubernetes only).
        api_client: a ``kubernetes.client.ApiClient`` (kubernetes only; tests).
        echo: receives each output line; default: stdout.

    Returns:
        What ran, for how long, and its last output lines.

    Raises:
        LaunchError: the training failed, timed out, or could not be started; the message says why.
    """
    if backend == "local":
        return run_local(train_args, nproc_per_node=nproc_per_node, module=module, timeout_s=timeout_s, echo=echo)
    if backend != "kubernetes":
        raise LaunchError(f"unknown training backend {backend!r}: expected 'local' or 'kubernetes'")
    if job is None:
        raise LaunchError("backend 'kubernetes' needs job=JobSpec(name=..., image=..., ...)")
    deadline = math.ceil(timeout_s) if timeout_s else job.timeout_s
    spec = replace(job, train_args=tuple(train_args), nproc_per_node=nproc_per_node, module=module, timeout_s=deadline)
    return run_kubernetes_job(
        spec, kind=job_kind, cleanup=cleanup, poll_interval_s=poll_interval_s, api_client=api_client, echo=echo
    )
