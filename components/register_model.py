"""``register_model``: log the student to MLflow, register a version and point the ``challenger`` alias at it."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def register_model(
    student: Input[Model],
    evaluation: Input[Artifact],
    dataset: Input[Dataset],
    model_name: str,
    mlflow_tracking_uri: str,
    run_id: str,
    params: list,
    registration: Output[Artifact],
) -> str:
    """Run ``dad register``; returns the new version's URI (``models:/<name>/<version>``).

    The first version of a model also becomes ``champion``; later ones wait for ``dad promote``.

    Args:
        student: the training run folder (its ``model/`` is registered).
        evaluation: the evaluation outputs; the numeric values of ``eval_report.json`` go on the version.
        dataset: the dataset, for the lineage tag.
        model_name: the registered model.
        mlflow_tracking_uri: the tracking server (or ``sqlite:///...`` file).
        run_id: the pipeline run, recorded as the version's ``dad.pipeline_run_id`` tag.
        params: dotted config overrides (``registry.*``, ``tracking.*``).
        registration: the result (name, version, aliases, run id, model URI) as JSON and metadata.
    """
    import json
    from pathlib import Path

    from dad_core.cli import register as cli

    tags = {"dad.pipeline_run_id": run_id, "dad.dataset_hash": dataset.metadata.get("dataset_hash", "")}
    argv = ["--checkpoint", str(Path(student.path) / "model"), "--name", model_name, "--alias", "challenger"]
    argv += ["--eval-report", str(Path(evaluation.path) / "eval_report.json"), "--output", registration.path]
    argv += ["--tracking-uri", mlflow_tracking_uri, *[f"--tag={k}={v}" for k, v in tags.items() if v]]
    code = cli.main(argv + [arg for item in params for arg in ("-p", item)])
    if code != 0:
        raise RuntimeError(f"dad register failed with exit code {code}; its message is in the log above")
    result = json.loads(Path(registration.path).read_text())
    registration.metadata.update({key: result[key] for key in ("name", "version", "model_uri", "run_id")})
    registration.metadata["aliases"] = list(result["aliases"])
    return result["model_uri"]
