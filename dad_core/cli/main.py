"""``dad <step> [args]``: one command for every step; each step is also ``python -m dad_core.cli.<step>``."""

from __future__ import annotations

import importlib
import sys

STEPS = {
    "prepare-data": ("prepare_data", "write the dataset (embedded digits, a folder, or a DVC revision) + manifest"),
    "finetune-teacher": ("finetune_teacher", "fine-tune the CLIP teacher from its zero-shot head"),
    "train-vqgan": ("train_vqgan", "train a small VQGAN where no published one fits"),
    "cache-teacher": ("cache_teacher", "make DAD samples and the teacher's soft labels, in resumable shards"),
    "train": ("train", "train a student with the DAD loss (also under torchrun)"),
    "evaluate": ("evaluate", "score a student on the clean and OOD suites"),
    "register": ("register", "log the student to MLflow and register a version (alias challenger)"),
    "promote": ("promote", "move the champion alias when the challenger wins the promotion gate"),
    "convert-checkpoint": (
        "convert_checkpoint",
        "rewrite a pickled checkpoint in the safe safetensors format, running nothing from it",
    ),
}


def _usage() -> str:
    lines = ["usage: dad <step> [--help] [args]", "", "steps:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in STEPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dad_core._version import __version__

        print(__version__)
        return 0
    if argv[0] not in STEPS:
        print(f"error: unknown step {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dad_core.cli.{STEPS[argv[0]][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
