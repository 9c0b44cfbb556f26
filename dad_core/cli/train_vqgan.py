"""``dad train-vqgan``: train a small VQGAN on the training images, for when no published checkpoint fits.

    dad train-vqgan --data-root data/digits --output models/vqgan.ckpt [-p vqgan.config=tiny-f4 -p vqgan.train.epochs=8]

Writes the checkpoint in the published taming layout (pass it on with ``-p vqgan.checkpoint=...``) and a JSON
report beside it; PSNR and codebook use are measured on ``<data-root>/val`` when it exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging, write_report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad train-vqgan", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", type=Path, help="prepared dataset: classes.txt, train/, val/ (default: data.root)"
    )
    parser.add_argument("--output", type=Path, default=Path("models/vqgan.ckpt"), help="checkpoint file")
    parser.add_argument("--report", type=Path, help="JSON report (default: <output>.report.json)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if present)")
    parser.add_argument("--no-progress", action="store_true")
    add_config_args(parser)
    return parser.parse_args(argv)


def _body(argv: list[str] | None) -> int:
    from dad_core.data import ImageFolderDataset, create_eval_transform, read_classes
    from dad_core.vqgan_train import train_vqgan

    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    root = args.data_root or Path(cfg.data.root)
    classes, transform = read_classes(root / "classes.txt"), create_eval_transform(cfg.data.image_size)
    train_set = ImageFolderDataset.from_folder(root / "train", classes, transform)
    val_set = ImageFolderDataset.from_folder(root / "val", classes, transform) if (root / "val").is_dir() else None
    report = train_vqgan(
        train_set, cfg.vqgan, args.output, device=args.device, val_dataset=val_set, progress=not args.no_progress
    )
    path = write_report(report, args.report or args.output.with_name(f"{args.output.name}.report.json"))
    val = report["val"]
    print(
        f"VQGAN {report['config']}: {report['eval_split']} PSNR {val['psnr_db']:.2f} dB, codebook usage "
        f"{100 * val['codebook_usage']:.1f}% (perplexity {val['perplexity']:.1f}), {report['steps']} steps at "
        f"{report['images_per_s']} images/s; checkpoint {report['output']}; report {path}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
