"""The ablation's steps: ``plan_ablation`` makes the cells, ``run_ablation_cell`` runs one, ``compare_ablation``
compares them. The work of each is in :mod:`dad_core.ablation`."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def plan_ablation(modes: str, seeds: str) -> list:
    """The loop's items, ``[{"mode": ..., "seed": ...}, ...]``: every mode with every seed.

    Args:
        modes: comma-separated modes (``ce,kd,vq_only,random,dad,dad-latent,dad@attack.eps=3.0``).
        seeds: comma-separated seeds (``0,1``).
    """
    from dad_core.ablation import plan_cells

    return plan_cells(modes, seeds)


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def run_ablation_cell(
    dataset: Input[Dataset],
    teacher: Input[Model],
    vqgan: Input[Model],
    cell: dict,
    params: list,
    cache_root: str,
    nproc_per_node: int,
    result: Output[Artifact],
) -> str:
    """Cache the teacher with the cell's attack (not for ``ce``), train with its seed, evaluate; returns the cell JSON.

    Args:
        dataset: the prepared dataset.
        teacher: the teacher checkpoint.
        vqgan: the VQGAN checkpoint.
        cell: ``{"mode", "seed"}``, an item of ``plan_ablation``.
        params: dotted config overrides of the run; the cell's own come after them.
        cache_root: the cell's cache goes to ``<cache_root>/<cell name>``.
        nproc_per_node: training processes.
        result: ``train/`` (the run folder), ``eval/`` (the evaluation) and ``cell.json``.
    """
    import json
    from pathlib import Path

    from dad_core.ablation import cell_name, run_cell

    mode, seed = cell["mode"], int(cell["seed"])  # loop items may carry floats
    paths = {"teacher_checkpoint": Path(teacher.path), "vqgan_checkpoint": Path(vqgan.path)}
    cache_dir = Path(cache_root) / cell_name(mode, seed)
    out = run_cell(mode, seed, data_root=Path(dataset.path), output_dir=Path(result.path), cache_dir=cache_dir,
                   params=params, nproc_per_node=nproc_per_node, **paths)  # fmt: skip
    result.metadata.update({"mode": mode, "seed": seed, **out["metrics"]})
    return json.dumps(out)


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def compare_ablation(
    cells: list,
    params: list,
    mlflow_tracking_uri: str,
    comparison: Output[Artifact],
    table: Output[Markdown],
    chart: Output[HTML],
    metrics: Output[Metrics],
):
    """Paired differences over seeds: JSON, Markdown, chart; to MLflow (a parent run, a child per cell) if tracked.

    Args:
        cells: the cells' JSON (``dsl.Collected``).
        params: dotted config overrides (``tracking.*``).
        mlflow_tracking_uri: the MLflow server; empty: no tracking.
        comparison: ``ablation_report.json``, ``ablation_report.md``, ``ablation.png``, ``ablation.html``.
        table: the Markdown table, rendered by the Kubeflow UI.
        chart: the table and the chart (an embedded PNG), rendered by the Kubeflow UI.
        metrics: the mean of each paired difference, ``<a>-minus-<b>/<metric>``.
    """
    import json
    import shutil
    from pathlib import Path

    from dad_core.ablation import ablation_report, log_ablation, save_ablation
    from dad_core.config import load_config

    results = [json.loads(c) if isinstance(c, str) else c for c in cells]
    paths = save_ablation(results, Path(comparison.path))
    shutil.copyfile(paths["markdown"], table.path)
    shutil.copyfile(paths["html"], chart.path)
    report = ablation_report(results)
    tracking = [f"tracking.uri={mlflow_tracking_uri}"] if mlflow_tracking_uri else []
    log_ablation(report, paths, load_config(None, [*params, *tracking]).tracking)
    for row in report["paired"]:
        metrics.log_metric(f"{row['pair'][0]}-minus-{row['pair'][1]}/{row['metric']}", row["mean"])
