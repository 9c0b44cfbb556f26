"""``dad promote``: move the ``champion`` alias to the ``challenger`` version when it passes the promotion gate.

    dad promote --model dad-student [--metric ood_mean_top1] [--margin 0.5] [--clean-tolerance 1.0]

The challenger wins when the OOD metric improves by at least the margin and the clean metric drops by no more
than the tolerance. Prints both versions' metrics and the decision; exits 0 whether it was accepted or rejected.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import add_config_args, config_from_args, run_main, setup_logging, write_report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad promote", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registered model name (default: registry.model_name)")
    parser.add_argument("--metric", default=None, help="OOD metric to improve (default: registry.metric)")
    parser.add_argument("--margin", type=float, default=None, help="required improvement (default: registry.margin)")
    parser.add_argument("--clean-metric", default=None, help="clean metric to protect (default: registry.clean_metric)")
    parser.add_argument(
        "--clean-tolerance",
        type=float,
        default=None,
        help="largest allowed drop of the clean metric (default: registry.clean_tolerance)",
    )
    parser.add_argument("--version", default=None, help="the version to gate (default: the one holding 'challenger')")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the decision as JSON here")
    add_config_args(parser)
    return parser.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    from dad_core.registry import format_table, promote

    reg = cfg.registry
    decision = promote(
        args.model or reg.model_name,
        metric=args.metric or reg.metric,
        margin=reg.margin if args.margin is None else args.margin,
        clean_metric=args.clean_metric or reg.clean_metric,
        clean_tolerance=reg.clean_tolerance if args.clean_tolerance is None else args.clean_tolerance,
        version=args.version,
        tracking_uri=args.tracking_uri or cfg.tracking.uri,
        timeout_s=cfg.tracking.timeout_s,
    )
    print(format_table(decision))
    print(f"decision: {decision.outcome} ({decision.reason})")
    print(f"champion: {decision.name} version {decision.champion}")
    if args.output is not None:
        write_report(decision.to_dict(), args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
