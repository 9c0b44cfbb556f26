"""``dad convert-checkpoint``: rewrite a pickled checkpoint as safetensors, the format the product reads.

    dad convert-checkpoint models/teacher_old.pt --output models/teacher.safetensors
    dad convert-checkpoint runs/train/checkpoint/state.pt --output runs/train/checkpoint/state.safetensors

The product never unpickles a file (a pickle can run any code when loaded); a file that needs more than tensors and
plain data is refused with a pointer here. This command reads SOURCE with the same restricted unpickler, nothing in
it runs: numpy values are rebuilt by numpy, whole pickled modules become their state dicts (parameters and persistent
buffers), and other objects are dropped with a warning. Convert once and use the output from then on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dad_core.cli._common import run_main, setup_logging


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dad convert-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the pickled file (.pt, .pth, .ckpt, state.pt)")
    parser.add_argument("--output", type=Path, required=True, help="the safetensors file to write")
    return parser.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    setup_logging()
    from dad_core.serialization import convert_pickled_file

    if not args.source.is_file():
        raise FileNotFoundError(f"no such file: {args.source}")
    print(f"converted {args.source} -> {convert_pickled_file(args.source, args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
