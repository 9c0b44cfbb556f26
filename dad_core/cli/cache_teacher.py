"""``dad cache-teacher``: run the teacher once over the training set (DAD samples + soft labels), sharded.

    dad cache-teacher --data-root data/digits --output cache/teacher [--shard-index 0 --num-shards 2] \\
        -p teacher.checkpoint=models/teacher.safetensors -p vqgan.checkpoint=models/vqgan.ckpt

Each worker writes its shards atomically and skips finished ones; the last one to finish writes manifest.json.
The attack-survival diagnostics (teacher top-1 before and after each discretization) go into the report and, with
tracking on, to MLflow as ``cache/*`` metrics (per shard: ``cache/shard/*`` with the shard id as step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging, write_report
from dad_core.config import ConfigError
from dad_core.distributed import resolve_device


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad cache-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, help="prepared dataset (default: data.root)")
    parser.add_argument("--output", type=Path, help="cache directory (default: cache.root)")
    parser.add_argument("--teacher-checkpoint", help="shorthand for -p teacher.checkpoint=...")
    parser.add_argument("--vqgan-checkpoint", help="shorthand for -p vqgan.checkpoint=...")
    parser.add_argument("--shard-index", type=int, default=0, help="this worker's index (0-based)")
    parser.add_argument("--num-shards", type=int, default=1, help="number of workers splitting the shards")
    parser.add_argument("--report", type=Path, help="JSON report (default: <output>/report-<index>.json)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if present)")
    parser.add_argument("--no-progress", action="store_true")
    add_config_args(parser)
    args = parser.parse_args(argv)
    args.params += [
        f"{key}={value}"
        for key, value in (("teacher.checkpoint", args.teacher_checkpoint), ("vqgan.checkpoint", args.vqgan_checkpoint))
        if value
    ]
    return args


def _body(argv: list[str] | None) -> int:
    from dad_core.attack import IdentityDiscretizer
    from dad_core.data import read_classes
    from dad_core.io import sha256_if_file
    from dad_core.teacher import create_clip_teacher
    from dad_core.teacher_cache import cache_teacher
    from dad_core.vqgan import VQGAN

    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    device = resolve_device(args.device)
    data_root, output = args.data_root or Path(cfg.data.root), args.output or Path(cfg.cache.root)
    t, v = cfg.teacher, cfg.vqgan
    if not v.checkpoint and cfg.attack.mode != "none":  # before loading anything: a ViT-L teacher takes minutes
        raise ConfigError(
            "vqgan.checkpoint: DAD samples need a trained VQGAN (a random one turns images into noise); "
            "run `dad train-vqgan` or pass a published checkpoint with --vqgan-checkpoint"
        )
    classes = read_classes(data_root / "classes.txt")
    teacher = create_clip_teacher(
        t.model_name, t.pretrained, t.checkpoint, list(classes.names), t.templates, device=device
    )
    vqgan = IdentityDiscretizer()
    if v.checkpoint:
        vqgan = VQGAN.from_checkpoint(v.checkpoint, config=v.config, precision=v.precision).to(device).eval()
    report = cache_teacher(
        cfg,
        data_root,
        output,
        teacher,
        vqgan,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        device=device,
        teacher_checkpoint_sha256=sha256_if_file(t.checkpoint),
        vqgan_checkpoint_sha256=sha256_if_file(v.checkpoint),
        progress=not args.no_progress,
    )
    path = write_report(report, args.report or output / f"report-{args.shard_index}.json")
    _log_to_mlflow(cfg, report, output)
    state = "complete" if report["complete"] else "waiting for other workers"
    diag = report["diagnostics"]
    top1 = ", ".join(
        f"{k[5:]} {diag[k]:.1%}" for k in ("top1_clean", "top1_vq", "top1_attacked", "top1_dad") if k in diag
    )
    print(
        f"cache {output}: {len(report['shards_written'])} shards written, {len(report['shards_skipped'])} "
        f"skipped, {report['images_per_s']} images/s; teacher top-1 {top1}; {state}; report {path}"
    )
    return 0


def _log_to_mlflow(cfg, report: dict, output: Path) -> None:
    """The attack config, the survival diagnostics (per shard, this worker's, the whole cache's) and samples.png."""
    from dad_core.config import config_to_dict
    from dad_core.tracking import create_tracker

    name = f"cache-teacher worker {report['shard_index']}/{report['num_shards']}"
    with create_tracker(cfg.tracking, primary=True, run_name=name, kind="cache-teacher") as tracker:
        tracker.log_params({"attack": config_to_dict(cfg.attack), "cache": config_to_dict(cfg.cache)})
        tracker.log_metrics({"cache/images_per_s": report.get("images_per_s")})
        for shard in report["shard_diagnostics"]:
            tracker.log_metrics({f"cache/shard/{k}": v for k, v in shard.items() if k != "shard"}, step=shard["shard"])
        tracker.log_metrics({f"cache/{k}": v for k, v in report["diagnostics"].items()})
        if report["complete"]:
            tracker.log_metrics({f"cache/all/{k}": v for k, v in report["cache_diagnostics"].items()})
            if (output / "samples.png").is_file():
                tracker.log_artifact(output / "samples.png", artifact_path="cache")


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
