"""Shared CLI plumbing: config arguments, logging set-up, JSON reports. Only ``cli/`` configures logging.

It is also where tracking credentials leave the URIs: only ``cli/`` (and ``distributed.py``) touch the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dad_core.config import DADConfig, load_config
from dad_core.errors import DADError

__all__ = [
    "add_config_args",
    "add_step_args",
    "config_from_args",
    "export_tracking_credentials",
    "fail",
    "report_path",
    "run_main",
    "setup_logging",
    "write_report",
]

_logger = logging.getLogger("dad_core.cli")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config params.yaml`` and repeated ``--param section.key=value`` (also ``-p``)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config namespaced per section (default: params.yaml if present, else built-ins)",
    )
    parser.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --param train.epochs=2 (repeatable)",
    )


def add_step_args(parser: argparse.ArgumentParser, *, output: Path, output_help: str) -> None:
    """The arguments of a step that reads a prepared dataset and writes one file plus its JSON report."""
    parser.add_argument("--data-root", type=Path, help="prepared dataset (default: data.root)")
    parser.add_argument("--output", type=Path, default=output, help=f"{output_help} (default: {output})")
    parser.add_argument("--report", type=Path, help="JSON report (default: <output>.report.json)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if present)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(parser)


def report_path(args: argparse.Namespace) -> Path:
    """``--report``, or ``<output>.report.json`` beside the output."""
    return args.report or args.output.with_name(f"{args.output.name}.report.json")


def config_from_args(args: argparse.Namespace) -> DADConfig:
    """The config from ``--config`` (else ``params.yaml`` if present) and ``--param``, its tracking URI bare.

    Raises:
        ConfigError: an unknown key or a bad value.
        TrackingError: a tracking URI's credentials conflict with the environment's.
    """
    path = args.config
    if path is None and Path("params.yaml").is_file():
        path = Path("params.yaml")
    return export_tracking_credentials(load_config(path, args.params), args)


def export_tracking_credentials(cfg: DADConfig, args: argparse.Namespace | None = None) -> DADConfig:
    """Move ``user:password`` out of the tracking URIs into ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``.

    Covers ``tracking.uri``, ``--tracking-uri`` (``args.tracking_uri``, rewritten in place) and
    ``MLFLOW_TRACKING_URI``. MLflow's HTTP client reads the two variables itself, so the run authenticates while
    config.yaml, params, logs, name lookups and child processes only ever see the bare URI.

    Returns:
        ``cfg`` with ``tracking.uri`` bare.

    Raises:
        TrackingError: the URI's credentials differ from the variables already set, or half of them is missing.
    """
    option = getattr(args, "tracking_uri", None)
    if not (cfg.tracking.uri or option or os.environ.get("MLFLOW_TRACKING_URI")):
        return cfg
    from dad_core.tracking import tracking_credentials  # imports torch: only when tracking is on

    def bare(uri: str) -> str:
        clean, credentials = tracking_credentials(uri)
        os.environ.update(credentials)
        return clean

    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = bare(os.environ["MLFLOW_TRACKING_URI"])
    if option:
        args.tracking_uri = bare(option)
    if not cfg.tracking.uri:
        return cfg
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=bare(cfg.tracking.uri)))


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs its model-building steps on the root logger at INFO, and warns about random weights that we
    ask for on purpose (the teacher is then fine-tuned or loaded from a checkpoint): keep the rest."""
    if "open_clip" not in record.pathname:
        return True
    return record.levelno > logging.WARNING or (
        record.levelno == logging.WARNING and "No pretrained weights loaded" not in record.getMessage()
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, so a stream replaced since (a caller's redirect,
    a test's capture that is now closed) never receives or breaks a later log line."""

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(primary: bool = True, level: int = logging.INFO) -> None:
    """Log to stderr on the primary rank; warnings only elsewhere."""
    logging.basicConfig(
        level=level if primary else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip)


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write a step's JSON report atomically and return its path."""
    from dad_core.io import atomic_write_json

    return atomic_write_json(Path(path), report)


def fail(message: str) -> int:
    """Print a one-line error that says what to fix; return the exit code."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, whatever the message holds
    return 2


def run_main(body, argv: list[str] | None) -> int:
    """Run a CLI body, turning expected user errors into one-line messages and exit code 2."""
    try:
        return body(argv)
    except (DADError, FileNotFoundError) as err:
        return fail(str(err))


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
