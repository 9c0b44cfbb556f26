"""``dad prepare-data``: write the dataset (embedded digits, an ImageNet-style folder, or a DVC revision) + manifest.

The report (counts, skipped files, images/s, dataset_hash, resolved data config) goes to ``--report``, by default
``<output>.report.json`` beside the dataset folder, so the dataset tree itself stays byte-reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging, write_report
from dad_core.config import ConfigError, config_to_dict


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad prepare-data", description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("digits", "folder", "dvc"), help="what to read (default: data.source)")
    parser.add_argument("--source-dir", help="folder: the ImageNet-style tree (default: data.source_dir)")
    parser.add_argument("--dvc-repo", help="dvc: git URL or path of the DVC repository (default: data.dvc_repo)")
    parser.add_argument("--dvc-rev", help="dvc: tag, branch or commit (default: data.dvc_rev)")
    parser.add_argument("--dvc-path", help="dvc: the tree's path inside the repository (default: data.source_dir)")
    parser.add_argument("--classes", type=Path, help="folder/dvc: explicit classes.txt (default: the source's own)")
    parser.add_argument("--output", type=Path, help="dataset folder, replaced atomically (default: data.root)")
    parser.add_argument("--report", type=Path, help="JSON report (default: <output>.report.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(parser)
    return parser.parse_args(argv)


def _body(argv: list[str] | None) -> int:
    from dad_core.prepare import prepare_digits, prepare_dvc, prepare_folder

    args = _parse_args(argv)
    flags = {
        "source": args.source,
        "source_dir": args.dvc_path or args.source_dir,
        "dvc_repo": args.dvc_repo,
        "dvc_rev": args.dvc_rev,
    }
    data = dataclasses.replace(config_from_args(args).data, **{k: v for k, v in flags.items() if v is not None})
    setup_logging()
    output = args.output or Path(data.root)
    progress = not args.no_progress
    if data.source == "digits":
        report = prepare_digits(output, data, progress=progress)
    elif not data.source_dir:
        raise ConfigError(f"data.source_dir: --source {data.source} needs --source-dir (folder) or --dvc-path (dvc)")
    elif data.source == "folder":
        report = prepare_folder(data.source_dir, output, data, classes_file=args.classes, progress=progress)
    elif not data.dvc_repo:
        raise ConfigError("data.dvc_repo: --source dvc needs --dvc-repo")
    else:
        report = prepare_dvc(
            data.dvc_repo,
            data.dvc_rev,
            data.source_dir,
            output,
            data,
            classes_file=args.classes,
            progress=progress,
            checkouts=data.dvc_checkouts,
        )
    report["config"] = config_to_dict(data)
    path = write_report(report, args.report or output.with_name(f"{output.name}.report.json"))
    cfg = config_from_args(args)
    if cfg.tracking.pipeline_run_id:  # the pipeline's first step: its MLflow parent run starts here
        from dad_core.tracking import open_pipeline_run

        open_pipeline_run(cfg.tracking, output, {**config_to_dict(cfg), "data": report["config"]})
    counts = ", ".join(f"{k} {v}" for k, v in {**report["counts"], **report.get("suites", {})}.items())
    print(
        f"prepared {output}: {counts}; {len(report['skipped'])} skipped; "
        f"dataset_hash {report['dataset_hash'][:16]}; report {path}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
