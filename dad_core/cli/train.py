"""``dad train``: train a student with the DAD loss; one process or ``torchrun --nproc_per_node N``.

    dad train --data-root data/digits --cache cache/teacher --output runs/train [--resume] [-p train.epochs=8]
    dad train --data-root data/digits --output runs/ce -p loss.kd_weight=0   (plain CE: no teacher, no cache)
    torchrun --standalone --nproc_per_node 2 -m dad_core.cli.train --cache cache/teacher ...

Beside the run (``report.json``, ``train_curve.json`` per epoch) it writes ``metrics.json``: val top-1, images/s,
steps and the last loss, the numbers ``dvc metrics show`` prints.

MLflow logging is on when ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` is set (rank 0 only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging
from dad_core.distributed import cleanup_distributed, is_primary
from dad_core.io import atomic_write_json


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad train", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, help="prepared dataset (default: data.root)")
    parser.add_argument(
        "--cache", type=Path, help="teacher cache directory (default: cache.root; none for plain CE, loss.kd_weight=0)"
    )
    parser.add_argument("--output", type=Path, help="run directory (default: train.output_dir)")
    parser.add_argument("--teacher-checkpoint", help="shorthand for -p teacher.checkpoint=... (online mode)")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint if present")
    parser.add_argument(
        "--resume-changed-config",
        action="store_true",
        help="with --resume: continue even though training settings changed since the checkpoint (else refused)",
    )
    parser.add_argument("--device", help="cpu, cuda ... (default: this rank's GPU if present)")
    parser.add_argument("--no-progress", action="store_true")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.teacher_checkpoint:
        args.params.append(f"teacher.checkpoint={args.teacher_checkpoint}")
    return args


def _body(argv: list[str] | None) -> int:
    from dad_core.train import fit

    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging(is_primary())
    try:
        report = fit(
            cfg,
            args.data_root or Path(cfg.data.root),
            args.cache or (Path(cfg.cache.root) if cfg.loss.uses_teacher else None),  # plain CE reads no cache
            args.output or Path(cfg.train.output_dir),
            resume=args.resume,
            resume_changed_config=args.resume_changed_config,
            device=args.device,
            progress=not args.no_progress,
        )
    finally:
        cleanup_distributed()
    if is_primary():
        scalars = {"val_top1": report["val_top1"], "images_per_s": report["images_per_s"], "steps": report["steps"]}
        atomic_write_json(Path(report["output_dir"]) / "metrics.json", {**scalars, "loss": report["final"].get("loss")})
        print(
            f"trained {report['steps']} steps, val top-1 {report['val_top1']:.2f}%, "
            f"{report['images_per_s']} images/s; model {report['model_dir']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
