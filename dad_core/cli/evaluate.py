"""``dad evaluate``: score a trained student on the clean and OOD suites; writes the report, a plot and config.yaml.

    python -m dad_core.cli.evaluate --checkpoint runs/train --output runs/eval [--suite digits-c ...] [-p k=v]
    torchrun --nproc_per_node 2 -m dad_core.cli.evaluate ...   (exact counts: each rank scores a disjoint slice)

Suites live under ``--suites-root`` (default ``eval.root``, else ``<data.root>/suites``); the classes come from
``<data.root>/classes.txt``. Outputs: ``eval_report.json``, ``eval_report.md``, ``accuracy.png``, ``config.yaml``,
and for DVC ``metrics.json`` (clean, OOD mean and per-suite top-1) and ``suite_top1.json`` (one row per suite).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging
from dad_core.config import save_config
from dad_core.distributed import cleanup_distributed, init_distributed, is_primary
from dad_core.evaluate import evaluate_ood, flat_metrics, save_report
from dad_core.io import atomic_write_json

_logger = logging.getLogger("dad_core.cli.evaluate")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="student checkpoint directory or file")
    parser.add_argument("--output", type=Path, default=None, help="report directory (default: eval.output_dir)")
    parser.add_argument("--suites-root", type=Path, default=None, help="suites folder (default: eval.root)")
    parser.add_argument("--suite", dest="suites", action="append", metavar="NAME", help="repeatable (eval.suites)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    # The flags become config overrides (after any -p), so the saved config.yaml records what actually ran.
    flags = {"eval.output_dir": args.output, "eval.root": args.suites_root, "eval.suites": args.suites}
    args.params += [f"{key}={json.dumps(v if isinstance(v, list) else str(v))}" for key, v in flags.items() if v]
    return args


def _run(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    cfg = config_from_args(args)
    _, device = init_distributed()
    setup_logging(is_primary())
    from dad_core.student import load_student  # the student's own module (timm); imported where used

    report = evaluate_ood(load_student(args.checkpoint, device), cfg, device=device)
    if is_primary():
        output = Path(cfg.eval.output_dir)
        paths = save_report(report, output)
        save_config(cfg, output / "config.yaml")
        atomic_write_json(output / "metrics.json", flat_metrics(report))
        rows = [{"suite": name, "top1": r["top1"]} for name, r in report["suites"].items() if r["status"] == "ok"]
        atomic_write_json(output / "suite_top1.json", rows)
        _log_to_training_run(cfg, args.checkpoint, report, paths)
        clean, ood = report["clean_top1"], report["ood_mean_top1"]
        _logger.info("clean top-1 %s, OOD mean top-1 %s; report in %s", clean, ood, paths["json"])
    cleanup_distributed()
    return 0


def _log_to_training_run(cfg, checkpoint: Path, report: dict, paths: dict) -> None:
    """Metrics and report files into the MLflow run that trained the checkpoint (a new run if none is known)."""
    from dad_core.evaluate import flatten_metrics
    from dad_core.tracking import create_tracker

    meta = checkpoint / "meta.json"
    run_id = json.loads(meta.read_text()).get("mlflow_run_id") if meta.is_file() else None
    with create_tracker(
        cfg.tracking, primary=True, run_name=None if run_id else "evaluate", run_id=run_id, kind="evaluate"
    ) as tracker:
        tracker.log_metrics({f"eval/{k}": v for k, v in flatten_metrics(report).items()})
        tracker.log_dataset(cfg.data.root, "evaluation")
        for path in paths.values():
            tracker.log_artifact(Path(path), artifact_path="evaluation")


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
