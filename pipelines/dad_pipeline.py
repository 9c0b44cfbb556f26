"""The DAD pipeline: prepare data, [fine-tune teacher], [train VQGAN], cache the teacher, train, evaluate, register.

    python pipelines/dad_pipeline.py --compile [--output dad_pipeline.yaml] [--param KEY=VALUE ...]
    python pipelines/dad_pipeline.py --submit --host URL [--experiment NAME] [--run-name NAME] [--param ...]
    python pipelines/dad_pipeline.py --local [--output-dir local_outputs] [--param ...]

``--param`` sets a pipeline parameter (``--param num_shards=4``); a dotted key (``--param train.epochs=2``) is a
config override that every step receives through the ``params`` list. The parameter defaults describe the cluster
(``pipelines/platform.py``, the names ``k8s/`` creates); ``--local`` swaps in their local counterparts
(:data:`LOCAL_DEFAULTS`) and runs the same pipeline with ``kfp.local`` on this machine, printing one line per step
(``pipelines/local_console.py``; the steps' full logs go to ``<output-dir>/logs/<time>/``).

The main knobs (:data:`KNOBS`: student model, epochs, attack mode, eps, loss variant) are typed parameters beside
``params``; the first step, ``config_overrides``, appends the ones that are set to ``params``, so they win over a
``params`` entry for the same key. The steps that resume (cache workers, training, evaluation) are retried
(:data:`RETRIES`); caching is off for the steps whose inputs may change under the same name (``prepare_data``: a DVC
branch or a folder; ``use_checkpoint``: a given URI) or that change state (``register_model``).

Platform settings live here only, on tasks, through ``kfp.kubernetes``:

* every step carries the client pod label (it may reach MLflow and the object store); the steps that read or write
  object storage or MLflow get the S3 credentials Secret as environment variables, and the steps that talk to MLflow
  its basic-auth credentials Secret, optionally (only ``k8s/overlays/prod`` creates it);
* every step runs as the image's non-root user and gets CPU and memory requests and limits (:data:`STEP_RESOURCES`);
  the rest of the *restricted* security context is the cluster's to enforce (``k8s/README.md``, "Trust boundary");
* the GPU steps (teacher fine-tuning, VQGAN training, the cache workers, evaluation, and training when it runs
  in the step's own pod) get ``nvidia.com/gpu``, the GPU tolerations and the GPU node selector;
* ``prepare_data`` and every step that reads images (the GPU steps, training and its job's pods) mount the datasets
  volume at :data:`DATASETS_MOUNT`: a ``data.source=folder`` tree and the DVC checkouts (one per revision, made by
  ``prepare_data``) live there and are read in place; the ``Dataset`` artifact carries their manifest and class list.
  The cache workers, the cache collector and training mount the teacher-cache volume at :data:`WORK_MOUNT`, the
  ``workdir``.

Two kinds of hand-over. Checkpoints that a step makes only when none is given (teacher, VQGAN) and the student
(made by one of two training branches) pass through ``dsl.If``/``dsl.Else``: each branch returns the artifact's
URI, and one ``dsl.importer`` turns the chosen URI back into a typed ``Model`` (``kfp.local`` cannot select
between artifacts with ``dsl.OneOf``, only between parameters; the importer works in both places). The teacher
cache is written by a ``dsl.ParallelFor`` of workers into one shared folder, ``<workdir>/cache/<run id>``, and
published by a collector as a ``Dataset`` artifact that points at it.
"""

import sys
from pathlib import Path

# Run as a script, sys.path[0] is this folder, where platform.py would shadow the standard library's `platform`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

from kfp import compiler, dsl, kubernetes  # noqa: E402

from pipelines._image_flag import check_image_flag, export_image_flag  # noqa: E402

if __name__ == "__main__":
    export_image_flag(sys.argv[1:])  # before the components are defined: they take DAD_IMAGE then

from components._image import DAD_IMAGE  # noqa: E402
from components.cache_teacher import cache_teacher, collect_teacher_cache, shard_indices  # noqa: E402
from components.config_overrides import config_overrides  # noqa: E402
from components.evaluate_ood import evaluate_ood  # noqa: E402
from components.finetune_teacher import finetune_teacher, use_checkpoint  # noqa: E402
from components.prepare_data import prepare_data  # noqa: E402
from components.register_model import register_model  # noqa: E402
from components.train_student import train_student  # noqa: E402
from components.train_vqgan import train_vqgan  # noqa: E402
from pipelines import platform  # noqa: E402

__all__ = [
    "DATASETS_MOUNT",
    "GPU",
    "GPUS_PER_STEP",
    "GPU_TOLERATIONS",
    "KNOBS",
    "LOCAL_DEFAULTS",
    "RETRIES",
    "STEP_RESOURCES",
    "WORK_MOUNT",
    "dad_pipeline",
    "local_tracking_uri",
    "main",
]

PIPELINE_NAME = "dad-pipeline"
GPU = "nvidia.com/gpu"
WORK_MOUNT = platform.WORK_MOUNT  # where the teacher-cache volume is mounted: the shared workdir of the cluster
DATASETS_MOUNT = platform.DATASETS_MOUNT  # where prepare_data sees the datasets volume
GPU_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]  # the usual taint of GPU nodes

# What --local runs with instead of the cluster defaults (workdir and the MLflow URI are filled in at run time).
LOCAL_DEFAULTS = {"backend": "local", "nproc_per_node": 2, "gpus_per_node": 0}
# GPUs of each single-process GPU step. A literal: KFP 2.17 does not pass a parameter used only in a resource
# setting into dsl.If / dsl.ParallelFor sub-DAGs, so a parameter here would fail those steps at run time.
GPUS_PER_STEP = 1
# The typed knobs beside `params` (config_overrides turns them into dotted overrides, after `params`).
KNOBS = ("student_model", "epochs", "attack_mode", "eps", "loss_variant")
RETRIES = 2  # of the steps that resume: the cache workers, training and evaluation
# CPU and memory of each kind of step, (request, limit); literals for the same reason. "light": bookkeeping (shard
# indices, checkpoint hand-over, the cache collector, the training launcher, registration); "data": prepare_data;
# "gpu": the single-GPU steps; "train": training in the step's own pod, sized like a prod training node.
STEP_RESOURCES = {
    "light": {"cpu": ("250m", "1"), "memory": ("512Mi", "2Gi")},
    "data": {"cpu": ("1", "4"), "memory": ("4Gi", "16Gi")},
    "gpu": {"cpu": ("4", "8"), "memory": ("16Gi", "48Gi")},
    "train": {"cpu": ("8", "16"), "memory": ("32Gi", "128Gi")},
}


def _client_pod(
    task: dsl.PipelineTask, size: str, s3_secret: Any = None, mlflow_secret: Any = None
) -> dsl.PipelineTask:
    """Label the step as a client of MLflow and the object store, size it and run it as the image's non-root user.

    The step gets the S3 credentials when it uses the object store and the MLflow credentials when it talks to MLflow.
    """
    kubernetes.add_pod_label(task, *platform.CLIENT_POD_LABEL)
    uid = platform.RUN_AS_USER
    kubernetes.set_security_context(task, run_as_user=uid, run_as_group=uid, run_as_non_root=True)
    (cpu_request, cpu_limit), (memory_request, memory_limit) = STEP_RESOURCES[size].values()
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    if s3_secret is not None:
        kubernetes.use_secret_as_env(task, s3_secret, {key: key for key in platform.S3_SECRET_KEYS})
    if mlflow_secret is not None:
        # Optional: a missing Secret (dev, whose MLflow needs no login) leaves the variables unset. An empty name
        # cannot stand for "none": Kubernetes rejects a secretKeyRef without a name.
        kubernetes.use_secret_as_env(task, mlflow_secret, {k: k for k in platform.MLFLOW_SECRET_KEYS}, optional=True)
    return task


def _on_gpu(task: dsl.PipelineTask, gpus: Any, tolerations: Any, node_selector: Any) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU).set_accelerator_limit(gpus)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.add_node_selector_json(task, node_selector)
    return task


def _retried(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Retry a step that resumes (a preempted node, a lost pod): twice, after 1 and then 2 minutes."""
    return task.set_retry(num_retries=RETRIES, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s")


def _checkpoint(uri: Any, train: Any, label: str, **inputs: Any) -> dsl.PipelineTask:
    """Train a checkpoint when ``uri`` is empty, else use ``uri``; either way, import it as a ``Model``.

    Returns:
        The importer task; its ``.output`` is the checkpoint.
    """
    with dsl.If(uri == "", name=f"no-{label}-checkpoint"):
        trained = train(**inputs)
    with dsl.Else(name=f"{label}-checkpoint-given"):
        given = _client_pod(use_checkpoint(uri=uri), "light").set_display_name(f"use-{label}-checkpoint")
        given.set_caching_options(False)  # the URI's contents may change under the same name
    chosen = dsl.OneOf(trained.outputs["Output"], given.output)
    importer = dsl.importer(artifact_uri=chosen, artifact_class=dsl.Model, reimport=False)
    return importer.set_display_name(f"import-{label}")


@dsl.pipeline(name=PIPELINE_NAME, description="Discrete Adversarial Distillation of a CLIP teacher into a timm student")
def dad_pipeline(
    params: list = [],  # noqa: B006 - a KFP parameter default (compiled into the spec), never mutated
    student_model: str = "",
    epochs: int = 0,
    attack_mode: str = "",
    eps: float = 0.0,
    loss_variant: str = "",
    teacher_checkpoint: str = "",
    vqgan_checkpoint: str = "",
    num_shards: int = 2,
    backend: str = "kubernetes",
    nproc_per_node: int = 1,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    model_name: str = "dad-student",
    mlflow_tracking_uri: str = platform.MLFLOW_TRACKING_URI,
    workdir: str = WORK_MOUNT,
    datasets_dir: str = DATASETS_MOUNT,
    namespace: str = platform.NAMESPACE,
    training_runtime: str = platform.TRAINING_RUNTIME,
    datasets_pvc: str = platform.DATASETS_PVC,
    cache_pvc: str = platform.CACHE_PVC,
    s3_secret: str = platform.S3_SECRET,
    mlflow_secret: str = platform.MLFLOW_SECRET,
    gpu_tolerations: list = GPU_TOLERATIONS,  # noqa: B006 - as above
    gpu_node_selector: dict = {},  # noqa: B006 - as above
) -> str:
    """Distil a CLIP teacher's OOD robustness into a small student; returns the registered version's URI.

    Args:
        params: dotted config overrides for every step, e.g. ``["train.epochs=2"]`` (defaults: ``params.yaml``).
        student_model: ``train.model``, a timm model name; empty: from ``params``/``params.yaml``.
        epochs: ``train.epochs``; 0: from ``params``/``params.yaml``.
        attack_mode: ``attack.mode`` (``dad``, ``vq_only``, ``random``, ``none``); empty: from ``params``.
        eps: ``attack.eps``; 0: from ``params``/``params.yaml``.
        loss_variant: ``loss.variant`` (``A`` or ``C``); empty: from ``params``/``params.yaml``. These five knobs
            are appended after ``params``, so a knob that is set wins over a ``params`` entry for the same key.
        teacher_checkpoint: a fine-tuned teacher to use; empty: fine-tune one.
        vqgan_checkpoint: a VQGAN to use; empty: train one on the training images.
        num_shards: parallel cache workers.
        backend: ``kubernetes`` (a Kubeflow Trainer job) or ``local`` (torchrun in the training step's pod).
        nproc_per_node: training processes per node.
        num_nodes: training nodes (``kubernetes``).
        gpus_per_node: GPUs per training node.
        model_name: the registered model.
        mlflow_tracking_uri: the MLflow server (or a ``sqlite:///`` file in local runs).
        workdir: the shared folder of the cache workers and the training nodes.
        datasets_dir: the datasets volume as the steps see it; a DVC revision is checked out once into its ``dvc/``
            folder and every step reads the images there.
        namespace: where the training job runs.
        training_runtime: the Kubeflow Trainer runtime of the training job.
        datasets_pvc: the datasets volume.
        cache_pvc: the teacher-cache volume, mounted as the workdir.
        s3_secret: the Secret with the S3 credentials.
        mlflow_secret: the Secret with MLflow basic-auth credentials; optional: where it does not exist, the steps
            talk to MLflow without them.
        gpu_tolerations: tolerations of the GPU pods.
        gpu_node_selector: node selector of the GPU pods.
    """
    gpu = {"tolerations": gpu_tolerations, "node_selector": gpu_node_selector}
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    knobs = {"student_model": student_model, "epochs": epochs, "attack_mode": attack_mode, "eps": eps}

    def merged(name: str) -> Any:
        task = config_overrides(
            params=given_params,
            loss_variant=loss_variant,
            mlflow_tracking_uri=mlflow_tracking_uri,
            pipeline_run_id=run_id,
            **knobs,
        ).set_display_name(name)
        return _client_pod(task, "light").output

    given_params = params
    params = merged("config-overrides")  # what every step gets
    data = _client_pod(prepare_data(params=params, datasets_dir=datasets_dir), "data", s3_secret, mlflow_secret)
    # Off: the source may change under the same settings (data.dvc_rev a branch, a data.source_dir folder).
    data.set_caching_options(False)
    kubernetes.mount_pvc(data, datasets_pvc, DATASETS_MOUNT)
    dataset = data.outputs["dataset"]

    def gpu_step(component: Any, **inputs: Any) -> dsl.PipelineTask:  # each logs a child run into MLflow
        inputs = {"params": params, **inputs}
        task = _client_pod(component(dataset=dataset, **inputs), "gpu", mlflow_secret=mlflow_secret)
        kubernetes.mount_pvc(task, datasets_pvc, DATASETS_MOUNT)  # the images of a folder or DVC dataset
        return _on_gpu(task, GPUS_PER_STEP, **gpu)

    teacher = _checkpoint(teacher_checkpoint, gpu_step, "teacher", component=finetune_teacher)
    vqgan = _checkpoint(vqgan_checkpoint, gpu_step, "vqgan", component=train_vqgan)

    cache_dir = f"{workdir}/cache/{run_id}"
    shards = _client_pod(shard_indices(num_shards=num_shards), "light")
    with dsl.ParallelFor(shards.output, name="cache-workers") as shard_index:
        # Merged again in the loop: kfp.local (2.17) hands a loop body every other step's output parameter as the
        # loop item, so the list made above would arrive there as the shard index.
        worker = gpu_step(
            cache_teacher,
            params=merged("worker-config-overrides"),
            teacher=teacher.output,
            vqgan=vqgan.output,
            cache_dir=cache_dir,
            shard_index=shard_index,
            num_shards=num_shards,
        )
        kubernetes.mount_pvc(worker, cache_pvc, WORK_MOUNT)
        _retried(worker)  # finished shards are skipped: a retry resumes
    collect = _client_pod(
        collect_teacher_cache(cache_dir=cache_dir, worker_reports=dsl.Collected(worker.output)), "light"
    )
    kubernetes.mount_pvc(collect, cache_pvc, WORK_MOUNT)

    inputs = {
        "dataset": dataset,
        "teacher_cache": collect.outputs["teacher_cache"],
        "params": params,
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "nproc_per_node": nproc_per_node,
        "num_nodes": num_nodes,
        "gpus_per_node": gpus_per_node,
        "workdir": workdir,
        "run_id": run_id,
        "job": {"image": DAD_IMAGE, "namespace": namespace, "runtime": training_runtime},
        "mounts": {WORK_MOUNT: cache_pvc, DATASETS_MOUNT: datasets_pvc},
        **gpu,
    }
    with dsl.If(backend == "kubernetes", name="train-on-kubeflow-trainer"):
        launcher = _client_pod(train_student(backend=backend, **inputs), "light", s3_secret, mlflow_secret)
        launcher.set_display_name("train-student-launcher")  # the GPUs go to the job's pods, not to this one
        _retried(launcher)  # re-attaches to the job of this run
        kubernetes.mount_pvc(launcher, cache_pvc, WORK_MOUNT)  # it stages the dataset's manifest there
    with dsl.Else(name="train-in-step"):
        in_step = _client_pod(train_student(backend=backend, **inputs), "train", s3_secret, mlflow_secret)
        _on_gpu(in_step, gpus_per_node, **gpu)
        in_step.set_display_name("train-student")
        _retried(in_step)  # --resume: continues from the last checkpoint
        kubernetes.mount_pvc(in_step, cache_pvc, WORK_MOUNT)
        kubernetes.mount_pvc(in_step, datasets_pvc, DATASETS_MOUNT)
    student = dsl.importer(
        artifact_uri=dsl.OneOf(launcher.outputs["Output"], in_step.outputs["Output"]),
        artifact_class=dsl.Model,
        reimport=False,
    ).set_display_name("import-student")

    evaluation = gpu_step(evaluate_ood, student=student.output, mlflow_tracking_uri=mlflow_tracking_uri)
    _retried(evaluation)
    registered = _client_pod(
        register_model(
            student=student.output,
            evaluation=evaluation.outputs["evaluation"],
            dataset=dataset,
            model_name=model_name,
            mlflow_tracking_uri=mlflow_tracking_uri,
            run_id=run_id,
            params=params,
        ),
        "light",
        s3_secret,
        mlflow_secret,
    )
    registered.set_caching_options(False)  # it changes the registry: a cached result would register nothing
    return registered.outputs["Output"]


# ------------------------------------------------------------------------------------------------ command line


class UsageError(Exception):
    """A bad command line; main() prints it as one line."""


def pipeline_parameters(pipeline: Any = None) -> dict[str, tuple[type, Any]]:
    """The parameters of ``pipeline`` (default: :func:`dad_pipeline`): name -> (type, default)."""
    signature = inspect.signature((pipeline or dad_pipeline).pipeline_func)
    return {name: (p.annotation, p.default) for name, p in signature.parameters.items()}


def _coerce(key: str, raw: str, kind: type) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind in (list, dict):
            value = json.loads(raw)
            if not isinstance(value, kind):
                raise ValueError(f"expected a JSON {kind.__name__}")
            return value
    except ValueError as err:
        raise UsageError(f"--param {key}={raw}: {err}") from None
    return raw


def parse_params(items: list[str], pipeline: Any = None) -> dict[str, Any]:
    """``["num_shards=4", "train.epochs=2"]`` -> pipeline arguments; dotted keys are appended to ``params``.

    Raises:
        UsageError: an item is not ``key=value``, names no pipeline parameter, or has a value of the wrong type.
    """
    known, arguments, overrides = pipeline_parameters(pipeline), {}, []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not of the form key=value")
        if "." in key:
            overrides.append(f"{key}={raw}")
        elif key not in known:
            raise UsageError(
                f"unknown pipeline parameter {key!r}; known: {', '.join(known)} "
                "(dotted config keys such as train.epochs=2 go to params)"
            )
        else:
            arguments[key] = _coerce(key, raw, known[key][0])
    from dad_core.config import redact_uri, split_userinfo  # torch-free

    for key in ("mlflow_tracking_uri", "tracking.uri"):  # a run's parameters are stored and shown in the UI
        value = arguments.get(key) or next((o.partition("=")[2] for o in overrides if o.startswith(f"{key}=")), "")
        if split_userinfo(str(value))[1] is not None:
            raise UsageError(
                f"{key} must not carry credentials ({redact_uri(str(value))}): pipeline parameters are stored in "
                "the run; give them through the MLflow Secret (k8s/README.md) or MLFLOW_TRACKING_USERNAME/PASSWORD"
            )
    if overrides:
        arguments["params"] = [*arguments.get("params", []), *overrides]
    knobs = {key: value for key, value in arguments.items() if key in KNOBS}
    if overrides or knobs:  # the list the steps will get, as config_overrides merges it
        _check_config_overrides(config_overrides.python_func(params=arguments.get("params", []), **knobs))
    return arguments


def _check_config_overrides(overrides: list[str]) -> None:
    """Fail now, not in the first step, on a config key or value the schema rejects."""
    from dad_core.config import ConfigError, load_config

    try:
        load_config(None, overrides)
    except ConfigError as err:
        raise UsageError(f"--param: {err}") from None


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    return [_sorted(item) for item in value] if isinstance(value, list) else value


def _stable_header(text: str, arguments: dict[str, Any], pipeline: Any = None) -> str:
    """Print dict-valued defaults in the spec's header comment with sorted keys.

    KFP renders them in protobuf map order, which changes from one process to the next; the spec itself is sorted.
    """
    lines = text.splitlines(keepends=True)
    for name, (kind, default) in pipeline_parameters(pipeline).items():
        prefix = f"#    {name}: {kind.__name__} [Default: "
        if kind in (list, dict):
            lines = [
                f"{prefix}{_sorted(arguments.get(name, default))}]\n" if line.startswith(prefix) else line
                for line in lines
            ]
    return "".join(lines)


def compile_pipeline(output: Path, arguments: dict[str, Any] | None = None, pipeline: Any = None) -> Path:
    """Write the spec of ``pipeline`` (default: :func:`dad_pipeline`); the same arguments give the same bytes."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline or dad_pipeline, str(output), pipeline_parameters=arguments or None)
    output.write_text(_stable_header(output.read_text(), arguments or {}, pipeline))
    return output


def _probe(host: str, timeout_s: float) -> None:
    """Fail in seconds when nothing answers at ``host`` (the client itself retries for minutes)."""
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()  # noqa: S310 - the user's own endpoint
    except urllib.error.HTTPError:
        return  # something answers (perhaps behind authentication): let the client talk to it
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def submit(args: argparse.Namespace, arguments: dict[str, Any], pipeline: Any = None) -> int:
    """Compile ``pipeline`` (default: :func:`dad_pipeline`) and start a run of it at ``args.host``."""
    import warnings

    import kfp

    warnings.filterwarnings(
        "ignore", message="This client only works with Kubeflow Pipeline v2", category=FutureWarning
    )
    _probe(args.host, args.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", pipeline=pipeline)
        try:
            client = kfp.Client(host=args.host, namespace=args.namespace)
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=args.run_name,
                experiment_name=args.experiment,
                namespace=args.namespace,
                service_account=args.service_account,
            )
        except Exception as err:  # the client raises many types (ApiException, MaxRetryError, ValueError, ...)
            message = " ".join(str(err).split())[:300]
            raise UsageError(
                f"Kubeflow Pipelines at {args.host} refused the run: {type(err).__name__}: {message}"
            ) from None
    print(f"submitted run {run.run_id} to {args.host} (experiment {args.experiment!r})")
    return 0


def _absolute(value: str) -> str:
    return value if not value or "://" in value else str(Path(value).resolve())


def local_tracking_uri(overrides: list[str]) -> str:
    """The MLflow of a local run: ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` (``params.yaml`` and the run's
    dotted overrides), else ``./mlflow.db``. A ``--param mlflow_tracking_uri=...`` beats all three."""
    from dad_core.config import load_config

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    params = Path("params.yaml")
    uri = load_config(params if params.is_file() else None, overrides).tracking.uri
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def _display_names(pipeline: Any) -> dict[str, str]:
    """Component name -> the task's display name; ``kfp.local`` names tasks after their components."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    return {t.component_ref.name.removeprefix("comp-"): t.task_info.name for dag in dags for t in dag.tasks.values()}


def _create_schema(uri: str) -> None:
    """Create the tables of a SQLite MLflow store now: parallel steps that each find a new file race to do it."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


RUNNERS = ("subprocess", "docker")  # --runner: each step a process here, or a container of the project image


def _docker_paths(arguments: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``arguments`` as the containers see them: the workdir at WORK_MOUNT, local checkpoints under it."""
    arguments = {**arguments, "workdir": WORK_MOUNT, "datasets_dir": DATASETS_MOUNT}
    for key in ("teacher_checkpoint", "vqgan_checkpoint"):
        value = arguments.get(key, "")
        if not value or "://" in value:
            continue
        path = Path(value)
        if not path.is_relative_to(workdir):
            raise UsageError(
                f"--runner docker: the steps see only the workdir ({workdir}) and the datasets folder; put {key} "
                f"under the workdir or give a URI the containers can read (s3://...)"
            )
        arguments[key] = f"{WORK_MOUNT}/{path.relative_to(workdir).as_posix()}"
    return arguments


def _docker_tracking_uri(arguments: dict[str, Any]) -> str | None:
    """The MLflow server the containers use: a given http(s) URI, or None (one is started for the run)."""
    given = arguments.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if given and not given.startswith(("http://", "https://")):
        raise UsageError(
            f"--runner docker: the steps run in containers and need an MLflow server, not {given!r}: give an "
            "http(s) URI with --param mlflow_tracking_uri=..., or none and one is started for the run"
        )
    return given or None


def run_local(
    output_dir: Path,
    arguments: dict[str, Any],
    runner: str = "subprocess",
    image: str = DAD_IMAGE,
    datasets_dir: Path | None = None,
) -> int:
    """Run the whole pipeline here with ``kfp.local``: one line per step, each step's log in a file, a summary.

    Args:
        output_dir: the run's folder: ``runs/`` (artifacts), ``logs/``, ``work/`` (the shared workdir).
        arguments: pipeline arguments over :data:`LOCAL_DEFAULTS`.
        runner: ``subprocess`` (each step a process of this Python) or ``docker`` (each step a container of
            ``image``, as in the cluster: ``pipelines/local_docker.py``; an ``mlflow server`` with SeaweedFS is
            started for the run unless ``mlflow_tracking_uri`` names one).
        image: the project image (``docker``).
        datasets_dir: the folder of the datasets volume (default ``<output_dir>/datasets``): where DVC revisions
            are checked out, mounted at :data:`DATASETS_MOUNT` with ``docker``.
    """
    from kfp import local

    from pipelines.local_console import StepConsole, plain

    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    output_dir = output_dir.resolve()
    in_docker = runner == "docker"
    given_uri = _docker_tracking_uri(arguments) if in_docker else None
    arguments = {**LOCAL_DEFAULTS, "workdir": str(output_dir / "work"), **arguments}
    arguments.setdefault("datasets_dir", str(datasets_dir or output_dir / "datasets"))
    for key in ("workdir", "datasets_dir", "teacher_checkpoint", "vqgan_checkpoint"):
        arguments[key] = _absolute(arguments.get(key, ""))
    workdir, datasets = Path(arguments["workdir"]), Path(arguments["datasets_dir"])
    if not in_docker:
        arguments.setdefault("mlflow_tracking_uri", local_tracking_uri(list(arguments.get("params", []))))
        workdir.mkdir(parents=True, exist_ok=True)
        if not Path("params.yaml").is_file():  # containers read the image's params.yaml instead
            print("note: no params.yaml in this folder: the steps run with the built-in defaults", file=sys.stderr)
    runs, logs = output_dir / "runs", output_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")
    store = ""  # the MLflow store of a server started for the run
    with contextlib.ExitStack() as stack:
        if in_docker:
            from pipelines import local_docker

            arguments = _docker_paths(arguments, workdir)
            try:
                step_runner = local_docker.docker_runner(
                    image, local_docker.shared_folder(workdir), local_docker.shared_folder(datasets)
                )
            except local_docker.DockerUnavailableError as err:
                raise UsageError(f"--runner docker: {err}") from None
            local_docker.shared_folder(runs)
            if given_uri is None:
                services = output_dir / "services"
                print(f"starting SeaweedFS and an mlflow server for the run (their data: {services})", flush=True)
                given_uri = stack.enter_context(local_docker.run_services(services))
                store = f"sqlite:///{services / 'mlflow' / 'mlflow.db'}"
            arguments["mlflow_tracking_uri"] = given_uri
            stack.enter_context(local_docker.open_umask())  # the steps (uid 10001) write into folders KFP makes here
        else:
            step_runner = local.SubprocessRunner(use_venv=False)
        local.init(runner=step_runner, pipeline_root=str(runs), raise_on_error=True)
        where = f"in containers of {image}" if in_docker else "locally"
        print(f"running {PIPELINE_NAME} {where}; each step's full log goes to {logs}/<step>.log", flush=True)
        start, console = time.monotonic(), StepConsole(logs, names=_display_names(dad_pipeline))
        try:
            with console:
                if arguments["mlflow_tracking_uri"].startswith("sqlite:"):
                    _create_schema(arguments["mlflow_tracking_uri"])
                result = dad_pipeline(**arguments)
        except RuntimeError as err:
            print(f"\n{console.summary()}", flush=True)
            failed = console.failed()
            where = f"its log: {failed.log}" if failed else f"the full log: {logs / 'pipeline.log'}"
            raise UsageError(f"the local run failed: {plain(str(err)).splitlines()[0]}; {where}") from None
        uri = arguments["mlflow_tracking_uri"]
        hint = _mlflow_ui_hint(uri, list(arguments.get("params", [])))
        if store:  # the server stops with the run; its store stays (the artifacts stay in its SeaweedFS data)
            hint = _mlflow_ui_hint(store, list(arguments.get("params", []))) + " (runs, metrics and registry)"
    run_dir = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    print(f"\n{console.summary()}")
    print(f"\nlocal run finished in {time.monotonic() - start:.0f}s")
    print(f"  outputs:          {run_dir}")
    print(f"  logs:             {logs}")
    print(f"  shared workdir:   {workdir}")
    print(f"  registered model: {result.output}")
    print(f"  MLflow UI:        {hint}")
    return 0


def _mlflow_ui_hint(uri: str, overrides: list[str]) -> str:
    """How to see the run: the experiment's link on an MLflow server, or the ``mlflow ui`` command and the link."""
    from dad_core.config import load_config
    from dad_core.tracking import experiment_link

    command = f"mlflow ui --backend-store-uri {uri}"
    try:
        from mlflow import MlflowClient

        params = Path("params.yaml")
        name = load_config(params if params.is_file() else None, overrides).tracking.experiment
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 - a hint: the run itself succeeded
        experiment = None
    if experiment is None:
        return command
    if uri.startswith(("http://", "https://")):
        return experiment_link(uri, experiment.experiment_id)
    return f"{command}, then open {experiment_link('http://127.0.0.1:5000', experiment.experiment_id)}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python pipelines/dad_pipeline.py", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile", action="store_true", help="write the pipeline spec")
    mode.add_argument("--submit", action="store_true", help="start a run on a Kubeflow Pipelines backend")
    mode.add_argument("--local", action="store_true", help="run the whole pipeline on this machine (kfp.local)")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline parameter, or a dotted config override such as train.epochs=2 (repeatable)",
    )
    parser.add_argument("--output", type=Path, default=Path("dad_pipeline.yaml"), help="--compile: spec file")
    parser.add_argument(
        "--image",
        default=None,
        help="the image of every step and of the training job: compiled into the spec (--compile/--submit), run "
        "by --runner docker (default: $DAD_IMAGE, else ghcr.io/dad-on-kubeflow/dad:<version>)",
    )
    parser.add_argument("--host", help="--submit: the Kubeflow Pipelines API, e.g. http://localhost:8080")
    parser.add_argument("--experiment", default="dad", help="--submit: experiment name")
    parser.add_argument("--run-name", default=None, help="--submit: run name")
    parser.add_argument("--namespace", default=platform.NAMESPACE, help="--submit: namespace of the run")
    parser.add_argument("--service-account", default=platform.SERVICE_ACCOUNT, help="--submit: the run's account")
    parser.add_argument("--timeout", type=float, default=5.0, help="--submit: seconds to wait for the host")
    parser.add_argument("--output-dir", type=Path, default=Path("local_outputs"), help="--local: where outputs go")
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default="subprocess",
        help="--local: run each step as a process of this Python (default) or in a container of the image, as uid "
        "10001 with a read-only root file system, like its pod (needs a Docker engine and the image built)",
    )
    parser.add_argument(
        "--datasets-dir",
        type=Path,
        default=None,
        help=f"--local: the folder of the datasets volume, where DVC revisions are checked out (mounted at "
        f"{DATASETS_MOUNT} with --runner docker; default: <output-dir>/datasets)",
    )
    args = parser.parse_args(argv)
    if args.submit and not args.host:
        parser.error("--submit needs --host URL")
    if args.runner != "subprocess" and not args.local:
        parser.error("--runner is an option of --local")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if message := check_image_flag(args.image, DAD_IMAGE):
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        arguments = parse_params(args.params)
        if args.compile:
            print(f"wrote {compile_pipeline(args.output, arguments)}")
            return 0
        if args.submit:
            return submit(args, arguments)
        return run_local(args.output_dir, arguments, args.runner, DAD_IMAGE, args.datasets_dir)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
