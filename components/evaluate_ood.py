"""``evaluate_ood``: score the student on the clean and OOD suites; metrics, Markdown and HTML reports, all outputs."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def evaluate_ood(
    dataset: Input[Dataset],
    student: Input[Model],
    params: list,
    evaluation: Output[Artifact],
    report: Output[Markdown],
    metrics: Output[Metrics],
    chart: Output[HTML],
    mlflow_tracking_uri: str = "",
) -> float:
    """Run ``dad evaluate`` on the student's final checkpoint; returns the mean OOD top-1.

    Args:
        dataset: the prepared dataset (classes and the generated suites under ``suites/``).
        student: the training run folder (its ``model/`` is scored).
        params: dotted config overrides (``eval.*``).
        evaluation: ``eval_report.json``, ``eval_report.md``, ``accuracy.png`` and ``config.yaml``.
        report: the Markdown report, rendered by the Kubeflow UI.
        metrics: ``clean_top1``, ``ood_mean_top1`` and ``<suite>_top1`` per suite that ran.
        chart: the accuracy chart (inlined) and the per-suite table, rendered by the Kubeflow UI.
        mlflow_tracking_uri: the metrics and report also go into the MLflow run that trained the student.
    """
    import json
    import shutil
    from pathlib import Path

    from dad_core.cli import evaluate as cli
    from dad_core.eval_html import eval_report_html
    from dad_core.evaluate import flat_metrics

    tracking = [f"tracking.uri={mlflow_tracking_uri}"] if mlflow_tracking_uri else []
    overrides = [arg for item in [*params, f"data.root={dataset.path}", *tracking] for arg in ("-p", item)]
    code = cli.main(["--checkpoint", str(Path(student.path) / "model"), "--output", evaluation.path, *overrides])
    if code != 0:
        raise RuntimeError(f"dad evaluate failed with exit code {code}; its message is in the log above")
    results = json.loads((Path(evaluation.path) / "eval_report.json").read_text())
    shutil.copyfile(Path(evaluation.path) / "eval_report.md", report.path)
    Path(chart.path).write_text(eval_report_html(results, Path(evaluation.path) / "accuracy.png"))
    scores = flat_metrics(results)
    evaluation.metadata.update(scores)
    for key, value in scores.items():
        metrics.log_metric(key, value)
    return float(results["ood_mean_top1"])
