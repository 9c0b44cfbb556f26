"""``dad finetune-teacher``: fine-tune the CLIP teacher on the training set, starting from its zero-shot head.

    dad finetune-teacher --data-root data/digits --output models/teacher.safetensors [-p finetune.epochs=6]

Writes the checkpoint (loadable by ``create_clip_teacher(checkpoint=...)``) and a JSON report beside it, with the
teacher's top-1 on each evaluation suite (``-p finetune.eval_suites=false`` skips them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_step_args, config_from_args, report_path, run_main, setup_logging, write_report
from dad_core.distributed import resolve_device


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad finetune-teacher", description=__doc__.splitlines()[0])
    add_step_args(parser, output=Path("models/teacher.safetensors"), output_help="checkpoint file")
    return parser.parse_args(argv)


def _body(argv: list[str] | None) -> int:
    from dad_core.finetune import finetune_teacher

    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    data_root = args.data_root or Path(cfg.data.root)
    report = finetune_teacher(
        cfg, data_root, args.output, device=resolve_device(args.device), progress=not args.no_progress
    )
    path = write_report(report, report_path(args))
    _log_to_mlflow(cfg, data_root, report, path)
    suites = "".join(f", {name} {top1:.2f}%" for name, top1 in report.get("suites", {}).items())
    print(
        f"teacher val top-1 {report['zero_shot_top1']:.2f}% zero-shot -> {report['top1']:.2f}% fine-tuned"
        f"{suites}; checkpoint {report['output']}; report {path}"
    )
    return 0


def _log_to_mlflow(cfg, data_root: Path, report: dict, report_file: Path) -> None:
    """A run ``finetune-teacher``: the teacher and fine-tuning settings, zero-shot -> fine-tuned top-1, suites."""
    from dad_core.config import config_to_dict
    from dad_core.tracking import create_tracker

    with create_tracker(cfg.tracking, primary=True, run_name="finetune-teacher", kind="finetune-teacher") as tracker:
        tracker.log_params({"teacher": config_to_dict(cfg.teacher), "finetune": config_to_dict(cfg.finetune)})
        tracker.log_dataset(data_root, "training")
        scores = ("zero_shot_top1", "top1", "clean_top1", "ood_mean_top1")
        tracker.log_metrics({f"teacher/{k}": report.get(k) for k in scores})
        tracker.log_metrics({f"teacher/{name}_top1": v for name, v in report.get("suites", {}).items()})
        tracker.set_tags({"dad.teacher_sha256": report.get("sha256", "")})
        tracker.log_artifact(report_file, artifact_path="teacher")


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
