"""``train_student``: distributed DAD training, ``torchrun`` in this step or a Kubeflow Trainer job it watches."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def train_student(
    dataset: Input[Dataset],
    teacher_cache: Input[Dataset],
    params: list,
    mlflow_tracking_uri: str,
    backend: str,
    nproc_per_node: int,
    num_nodes: int,
    gpus_per_node: int,
    workdir: str,
    run_id: str,
    job: dict,
    mounts: dict,
    tolerations: list,
    node_selector: dict,
    student: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train the student through ``dad_core.launch.launch_training``; returns the run folder's URI.

    On ``backend="local"`` torchrun runs in this step and writes straight into the artifact. On ``"kubernetes"``
    the dataset is staged into ``<workdir>/runs/<run_id>`` on the shared volume, the job's pods train there (resuming
    after a retry), and the result is copied back into the artifact.

    Args:
        dataset: the prepared dataset.
        teacher_cache: the collected cache; its metadata ``path`` is the shared cache folder.
        params: dotted config overrides (``train.*``, ``loss.*``).
        mlflow_tracking_uri: where rank 0 logs the run.
        backend: ``local`` or ``kubernetes``.
        nproc_per_node: processes per node (one per GPU on GPU nodes).
        num_nodes: training nodes (``kubernetes``).
        gpus_per_node: GPUs per training node (``kubernetes``).
        workdir: the shared folder (``kubernetes``).
        run_id: the pipeline run; names the staging folder and the job (a retried step re-attaches to it).
        job: ``JobSpec`` fields of the training job: ``image``, ``namespace``, ``runtime``.
        mounts: volumes of the training pods, mount path -> PVC name.
        tolerations: tolerations of the training pods.
        node_selector: node selector of the training pods.
        student: the run folder: ``model/`` (the final checkpoint), ``checkpoint/``, ``report.json``, ``config.yaml``.
        metrics: the validation top-1.
    """
    import json
    import shutil
    from pathlib import Path

    from dad_core.launch import JobSpec, job_name, launch_training

    remote, stage = backend == "kubernetes", Path(workdir) / "runs" / run_id
    data, output = (stage / "data", stage / "train") if remote else (Path(dataset.path), Path(student.path))
    args = ["--data-root", str(data), "--cache", teacher_cache.metadata["path"], "--output", str(output), "--resume"]
    args += ["--no-progress", *[a for item in [*params, f"tracking.uri={mlflow_tracking_uri}"] for a in ("-p", item)]]
    if remote:  # the job's pods see the shared volume, not this pod's copies of the artifacts
        shutil.copytree(dataset.path, data, dirs_exist_ok=True)
    volumes = {claim: path for path, claim in mounts.items()}
    pods = dict(job, tolerations=tolerations, node_selector=node_selector, pvc_mounts=volumes)
    spec = JobSpec(name=job_name(run_id), num_nodes=num_nodes, gpus_per_node=gpus_per_node, **pods) if remote else None
    launch_training(backend=backend, train_args=args, nproc_per_node=nproc_per_node, job=spec)
    if remote:
        shutil.copytree(output, student.path, dirs_exist_ok=True)
    report = json.loads((Path(student.path) / "report.json").read_text())
    student.metadata.update({k: report[k] for k in ("val_top1", "images_per_s", "steps", "epochs", "world_size")})
    metrics.log_metric("student_val_top1", report["val_top1"])
    return student.uri
