"""``config_overrides``: the pipeline's typed knobs merged into its ``params`` list, the overrides every step gets."""

from kfp import dsl

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def config_overrides(
    params: list,
    student_model: str = "",
    epochs: int = 0,
    attack_mode: str = "",
    eps: float = 0.0,
    loss_variant: str = "",
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
) -> list:
    """``params`` followed by the knobs that are set (not empty, not 0) as dotted overrides.

    The knobs come last, so they win over an entry of ``params`` for the same key: they are the fields a person
    fills in the Kubeflow UI, while ``params`` usually carries defaults compiled into the spec.

    Args:
        params: dotted config overrides, e.g. ``["train.epochs=2"]``.
        student_model: ``train.model``, a timm model name.
        epochs: ``train.epochs``.
        attack_mode: ``attack.mode`` (``dad``, ``vq_only``, ``random``, ``none``).
        eps: ``attack.eps``.
        loss_variant: ``loss.variant`` (``A`` or ``C``).
        mlflow_tracking_uri: ``tracking.uri``: every step tracks into this MLflow.
        pipeline_run_id: ``tracking.pipeline_run_id``: every step's MLflow run is a child of this pipeline run's
            parent run. Being different in each run, it also keeps KFP from reusing a step of another run, whose
            MLflow run would belong to that run (``teacher_checkpoint`` / ``vqgan_checkpoint`` reuse a result).
    """
    import json

    knobs = {
        "train.model": student_model,
        "train.epochs": epochs,
        "attack.mode": attack_mode,
        "attack.eps": eps,
        "loss.variant": loss_variant,
    }
    # Strings the YAML parser must not turn into numbers (a local run id is all digits): quoted.
    text = {"tracking.uri": mlflow_tracking_uri, "tracking.pipeline_run_id": pipeline_run_id}
    knobs.update({key: json.dumps(value) for key, value in text.items() if value})
    return [*params, *(f"{key}={value}" for key, value in knobs.items() if value not in ("", 0))]
