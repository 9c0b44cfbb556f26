"""The ablation pipeline: does the attack help? One teacher and one VQGAN, then a cell per mode and seed, compared.

    python pipelines/ablation_pipeline.py --compile [--output ablation_pipeline.yaml] [--param KEY=VALUE ...]
    python pipelines/ablation_pipeline.py --submit --host URL [--experiment NAME] [--run-name NAME] [--param ...]
    python pipelines/ablation_pipeline.py --local [--output-dir ablation_runs] [--param seeds=0,1] [--param ...]

``--param modes=ce,kd,vq_only,random,dad`` (the default) picks the cells' modes (``dad_core.ablation``: also
``dad-latent`` and custom cells ``<mode>@key=value,key=value``), ``--param seeds=0,1`` their seeds, and dotted keys
(``--param train.epochs=2``) are config overrides every step receives, as in ``pipelines/dad_pipeline.py``, whose
command line, platform settings and checkpoint hand-over this pipeline shares.

The steps: ``prepare_data``; the teacher and the VQGAN, trained once or taken from ``teacher_checkpoint`` /
``vqgan_checkpoint``; a ``dsl.ParallelFor`` over the cells, each one ``run_ablation_cell`` step (its own teacher
cache, except ``ce``; training with the cell's seed, in the step, torchrun for several processes; evaluation);
and ``compare_ablation``, which writes ``ablation_report.json``/``.md``/``ablation.png`` (a Markdown and an HTML view
in the Kubeflow UI) and, with tracking on, an MLflow parent run with a child per cell. ``--local`` also copies the
comparison files into ``--output-dir``.
"""

import sys
from pathlib import Path

# Run as a script, sys.path[0] is this folder, where platform.py would shadow the standard library's `platform`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from kfp import dsl, kubernetes  # noqa: E402

from pipelines._image_flag import check_image_flag, export_image_flag  # noqa: E402

if __name__ == "__main__":
    export_image_flag(sys.argv[1:])  # before the components are defined: they take DAD_IMAGE then

from components._image import DAD_IMAGE  # noqa: E402
from components.ablation import compare_ablation, plan_ablation, run_ablation_cell  # noqa: E402
from components.finetune_teacher import finetune_teacher  # noqa: E402
from components.prepare_data import prepare_data  # noqa: E402
from components.train_vqgan import train_vqgan  # noqa: E402
from pipelines import dad_pipeline as main_pipeline  # noqa: E402
from pipelines import platform  # noqa: E402
from pipelines.dad_pipeline import (  # noqa: E402
    DATASETS_MOUNT,
    GPU_TOLERATIONS,
    GPUS_PER_STEP,
    WORK_MOUNT,
    UsageError,
    _absolute,
    _checkpoint,
    _client_pod,
    _on_gpu,
)

__all__ = ["LOCAL_DEFAULTS", "ablation_pipeline", "main"]

PIPELINE_NAME = "dad-ablation"
COMPARISON_FILES = ("ablation_report.json", "ablation_report.md", "ablation.png", "ablation.html")
# What --local runs with instead of the cluster defaults (workdir and the MLflow URI are filled in at run time).
LOCAL_DEFAULTS = {"nproc_per_node": 1}


@dsl.pipeline(name=PIPELINE_NAME, description="DAD ablation: ce, kd, vq_only, random, dad (and more) over seeds")
def ablation_pipeline(
    params: list = [],  # noqa: B006 - a KFP parameter default (compiled into the spec), never mutated
    modes: str = "ce,kd,vq_only,random,dad",
    seeds: str = "0,1",
    teacher_checkpoint: str = "",
    vqgan_checkpoint: str = "",
    nproc_per_node: int = 1,
    mlflow_tracking_uri: str = platform.MLFLOW_TRACKING_URI,
    workdir: str = WORK_MOUNT,
    datasets_pvc: str = platform.DATASETS_PVC,
    cache_pvc: str = platform.CACHE_PVC,
    s3_secret: str = platform.S3_SECRET,
    mlflow_secret: str = platform.MLFLOW_SECRET,
    gpu_tolerations: list = GPU_TOLERATIONS,  # noqa: B006 - as above
    gpu_node_selector: dict = {},  # noqa: B006 - as above
):
    """Train and evaluate a student per mode and seed from one teacher and VQGAN; compare the modes paired by seed.

    Args:
        params: dotted config overrides for every step, e.g. ``["train.epochs=2"]`` (defaults: ``params.yaml``).
        modes: comma-separated modes (``dad_core.ablation.MODES``, or ``<mode>@key=value,...``).
        seeds: comma-separated seeds; each cell trains with ``train.seed`` and caches with ``cache.seed``.
        teacher_checkpoint: a fine-tuned teacher to use; empty: fine-tune one.
        vqgan_checkpoint: a VQGAN to use; empty: train one on the training images.
        nproc_per_node: training processes in each cell's step (one per GPU of the step).
        mlflow_tracking_uri: the MLflow server (or a ``sqlite:///`` file in local runs); empty: no tracking.
        workdir: the shared folder where the cells' teacher caches go.
        datasets_pvc: the datasets volume.
        cache_pvc: the teacher-cache volume, mounted as the workdir.
        s3_secret: the Secret with the S3 credentials.
        mlflow_secret: the Secret with MLflow basic-auth credentials (optional).
        gpu_tolerations: tolerations of the GPU pods.
        gpu_node_selector: node selector of the GPU pods.
    """
    gpu = {"tolerations": gpu_tolerations, "node_selector": gpu_node_selector}
    data = _client_pod(prepare_data(params=params), "data", s3_secret)
    kubernetes.mount_pvc(data, datasets_pvc, DATASETS_MOUNT)
    dataset = data.outputs["dataset"]

    def gpu_step(component: Any, **inputs: Any) -> dsl.PipelineTask:
        task = _client_pod(component(dataset=dataset, params=params, **inputs), "gpu")
        return _on_gpu(task, GPUS_PER_STEP, **gpu)

    teacher = _checkpoint(teacher_checkpoint, gpu_step, "teacher", component=finetune_teacher)
    vqgan = _checkpoint(vqgan_checkpoint, gpu_step, "vqgan", component=train_vqgan)

    plan = _client_pod(plan_ablation(modes=modes, seeds=seeds), "light")
    cache_root = f"{workdir}/ablation/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}"
    with dsl.ParallelFor(plan.output, name="cells") as cell:
        run = _client_pod(
            run_ablation_cell(
                dataset=dataset,
                teacher=teacher.output,
                vqgan=vqgan.output,
                cell=cell,
                params=params,
                cache_root=cache_root,
                nproc_per_node=nproc_per_node,
            ),
            "train",
        )
        _on_gpu(run, GPUS_PER_STEP, **gpu)
        kubernetes.mount_pvc(run, cache_pvc, WORK_MOUNT)
    _client_pod(
        compare_ablation(
            cells=dsl.Collected(run.outputs["Output"]), params=params, mlflow_tracking_uri=mlflow_tracking_uri
        ),
        "light",
        s3_secret,
        mlflow_secret,
    )


# ------------------------------------------------------------------------------------------------ command line


def run_local(output_dir: Path, arguments: dict[str, Any]) -> int:
    """Run the ablation here with ``kfp.local``; copy the comparison into ``output_dir`` and print where it went."""
    from kfp import local

    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    output_dir = output_dir.resolve()
    arguments = {
        **LOCAL_DEFAULTS,
        "workdir": str(output_dir / "work"),
        "mlflow_tracking_uri": f"sqlite:///{Path('mlflow.db').resolve()}",
        **arguments,
    }
    for key in ("workdir", "teacher_checkpoint", "vqgan_checkpoint"):
        arguments[key] = _absolute(arguments.get(key, ""))
    Path(arguments["workdir"]).mkdir(parents=True, exist_ok=True)
    runs = output_dir / "runs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs), raise_on_error=True)
    start = time.monotonic()
    try:
        ablation_pipeline(**arguments)
    except RuntimeError as err:
        raise UsageError(f"the local run failed: {str(err).splitlines()[0]} (the step's log is above)") from None
    run_dir = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    for name in COMPARISON_FILES:
        shutil.copyfile(run_dir / "compare-ablation" / "comparison" / name, output_dir / name)
    print(f"\nlocal ablation finished in {time.monotonic() - start:.0f}s")
    print(f"  comparison:  {output_dir / 'ablation_report.md'} (and .json, ablation.png, ablation.html)")
    print(f"  step outputs: {run_dir}")
    if arguments["mlflow_tracking_uri"]:
        print(f"  MLflow UI:   mlflow ui --backend-store-uri {arguments['mlflow_tracking_uri']}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python pipelines/ablation_pipeline.py", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile", action="store_true", help="write the pipeline spec")
    mode.add_argument("--submit", action="store_true", help="start a run on a Kubeflow Pipelines backend")
    mode.add_argument("--local", action="store_true", help="run the whole ablation on this machine (kfp.local)")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline parameter (modes=..., seeds=...), or a dotted config override such as train.epochs=2",
    )
    parser.add_argument("--output", type=Path, default=Path("ablation_pipeline.yaml"), help="--compile: spec file")
    parser.add_argument(
        "--image",
        default=None,
        help="--compile/--submit: the image of every step and of the training job (default: $DAD_IMAGE, else "
        "ghcr.io/dad-on-kubeflow/dad:<version>)",
    )
    parser.add_argument("--host", help="--submit: the Kubeflow Pipelines API, e.g. http://localhost:8080")
    parser.add_argument("--experiment", default="dad-ablation", help="--submit: experiment name")
    parser.add_argument("--run-name", default=None, help="--submit: run name")
    parser.add_argument("--namespace", default=platform.NAMESPACE, help="--submit: namespace of the run")
    parser.add_argument("--service-account", default=platform.SERVICE_ACCOUNT, help="--submit: the run's account")
    parser.add_argument("--timeout", type=float, default=5.0, help="--submit: seconds to wait for the host")
    parser.add_argument("--output-dir", type=Path, default=Path("ablation_runs"), help="--local: where outputs go")
    args = parser.parse_args(argv)
    if args.submit and not args.host:
        parser.error("--submit needs --host URL")
    return args


def _check_cells(arguments: dict[str, Any]) -> None:
    """Fail now, not in the plan step, on an unknown mode or a bad seed."""
    from dad_core.ablation import plan_cells

    defaults = main_pipeline.pipeline_parameters(ablation_pipeline)
    try:
        plan_cells(arguments.get("modes", defaults["modes"][1]), arguments.get("seeds", defaults["seeds"][1]))
    except ValueError as err:
        raise UsageError(f"--param: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if message := check_image_flag(args.image, DAD_IMAGE):
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        arguments = main_pipeline.parse_params(args.params, ablation_pipeline)
        _check_cells(arguments)
        if args.compile:
            print(f"wrote {main_pipeline.compile_pipeline(args.output, arguments, ablation_pipeline)}")
            return 0
        if args.submit:
            return main_pipeline.submit(args, arguments, ablation_pipeline)
        return run_local(args.output_dir, arguments)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
