"""``dad register``: log a trained student as an MLflow model, register a new version and point an alias at it.

    dad register --checkpoint runs/train/best --eval-report runs/eval/report.json --name dad-student \\
        --tag dad.dvc_rev=$(git rev-parse HEAD) [--alias challenger] [--tracking-uri http://mlflow:5000]

Every numeric top-level key of the evaluation report is logged as a metric and kept on the version for the
promotion gate (``dad promote``); a report without the gate's two metrics (``registry.metric``,
``registry.clean_metric``) is refused. ``--promote`` runs the gate for the new version at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging, write_report
from dad_core.errors import DADError


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad register", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="student checkpoint dir (state.safetensors + meta.json)"
    )
    parser.add_argument("--eval-report", type=Path, required=True, help="evaluation JSON (numeric top-level keys)")
    parser.add_argument("--name", default=None, help="registered model name (default: registry.model_name)")
    parser.add_argument("--alias", default="challenger", help="alias for the new version (default: challenger)")
    parser.add_argument(
        "--tag", dest="tags", action="append", default=[], metavar="K=V", help="version tag (repeatable)"
    )
    parser.add_argument(
        "--promote", action="store_true", help="run the promotion gate (registry.*) for the new version right away"
    )
    parser.add_argument("--run-id", default=None, help="log the model in this MLflow run (e.g. the training run)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: tracking.uri, MLFLOW_TRACKING_URI)")
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    add_config_args(parser)
    return parser.parse_args(argv)


def parse_tags(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; an item without ``=`` is an error naming it."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DADError(f"--tag {item!r} is not of the form key=value")
        tags[key.strip()] = value
    return tags


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    from dad_core.registry import Gate, load_eval_metrics, register_model
    from dad_core.tracking import finish_pipeline_run

    table = args.eval_report.with_suffix(".md")  # dad evaluate writes eval_report.md beside eval_report.json
    metrics = load_eval_metrics(args.eval_report)
    result = register_model(
        args.checkpoint,
        metrics,
        name=args.name or cfg.registry.model_name,
        alias=args.alias,
        tags=parse_tags(args.tags),
        tracking_uri=args.tracking_uri or cfg.tracking.uri,
        run_id=args.run_id,
        experiment=cfg.tracking.experiment,
        timeout_s=cfg.tracking.timeout_s,
        gate=Gate.from_config(cfg.registry),
        promote=args.promote,
        description=table.read_text() if table.is_file() else None,
    )
    # The pipeline's last step: its MLflow parent run is done.
    finish_pipeline_run(dataclasses.replace(cfg.tracking, uri=args.tracking_uri or cfg.tracking.uri), metrics=metrics)
    print(f"name: {result['name']}\nversion: {result['version']}\nalias: {', '.join(result['aliases'])}")
    if result["promotion"] is not None:
        print(f"promotion: {result['promotion']['outcome']} ({result['promotion']['reason']})")
    print(f"model_uri: {result['model_uri']}\nrun_id: {result['run_id']}")
    if args.output is not None:
        write_report(result, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
