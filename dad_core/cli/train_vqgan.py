"""``dad train-vqgan``: train a small VQGAN on the training images, for when no published checkpoint fits.

    dad train-vqgan --data-root data/digits --output models/vqgan.ckpt [-p vqgan.config=tiny-f4 -p vqgan.train.epochs=8]

Writes the checkpoint in the published taming layout (pass it on with ``-p vqgan.checkpoint=...``) and a JSON
report beside it; PSNR and codebook use are measured on ``<data-root>/val`` when it exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_step_args, config_from_args, report_path, run_main, setup_logging, write_report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad train-vqgan", description=__doc__.splitlines()[0])
    add_step_args(parser, output=Path("models/vqgan.ckpt"), output_help="checkpoint file")
    return parser.parse_args(argv)


def _body(argv: list[str] | None) -> int:
    from dad_core.data import create_eval_transform, open_split
    from dad_core.vqgan_train import train_vqgan

    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    root, transform = args.data_root or Path(cfg.data.root), create_eval_transform(cfg.data.image_size)
    train_set = open_split(root, "train", transform)
    val_set = (
        open_split(root, "val", transform) if (root / "val").is_dir() or (root / "manifest.json").is_file() else None
    )
    report = train_vqgan(
        train_set, cfg.vqgan, args.output, device=args.device, val_dataset=val_set, progress=not args.no_progress
    )
    path = write_report(report, report_path(args))
    _log_to_mlflow(cfg, root, report, path)
    val = report["val"]
    print(
        f"VQGAN {report['config']}: {report['eval_split']} PSNR {val['psnr_db']:.2f} dB, codebook usage "
        f"{100 * val['codebook_usage']:.1f}% (perplexity {val['perplexity']:.1f}), {report['steps']} steps at "
        f"{report['images_per_s']} images/s; checkpoint {report['output']}; report {path}"
    )
    return 0


def _log_to_mlflow(cfg, data_root: Path, report: dict, report_file: Path) -> None:
    """A run ``train-vqgan``: its settings, PSNR, codebook use and perplexity, and the reconstruction grid."""
    from dad_core.config import config_to_dict
    from dad_core.tracking import create_tracker

    with create_tracker(cfg.tracking, primary=True, run_name="train-vqgan", kind="train-vqgan") as tracker:
        tracker.log_params({"vqgan": config_to_dict(cfg.vqgan)})
        tracker.log_dataset(data_root, "training")
        tracker.log_metrics({f"vqgan/{k}": v for k, v in report["val"].items()})
        tracker.log_metrics({"vqgan/images_per_s": report["images_per_s"], "vqgan/steps": report["steps"]})
        tracker.set_tags({"dad.vqgan_sha256": report.get("sha256", "")})
        tracker.log_artifact(report_file, artifact_path="vqgan")
        if report.get("reconstructions"):
            tracker.log_artifact(Path(report["reconstructions"]), artifact_path="vqgan")


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
