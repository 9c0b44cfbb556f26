"""``--image`` of the pipeline scripts, read before the components are imported (they take the image then)."""

from __future__ import annotations

import os


def export_image_flag(argv: list[str]) -> None:
    """Put the value of ``--image IMAGE`` (or ``--image=IMAGE``) in ``argv`` into ``DAD_IMAGE``; argparse checks
    the rest of the command line later."""
    for index, arg in enumerate(argv):
        if arg == "--image" and index + 1 < len(argv):
            os.environ["DAD_IMAGE"] = argv[index + 1]
        elif arg.startswith("--image="):
            os.environ["DAD_IMAGE"] = arg.partition("=")[2]


def check_image_flag(image: str | None, imported: str) -> str | None:
    """An error message when ``--image`` differs from the image the components were defined with (``main()``
    called in-process after the components were imported), else None."""
    if image and image != imported:
        return (
            f"--image {image}: the components were imported with {imported}; pass --image on the script's own "
            "command line, or set DAD_IMAGE before importing the pipeline module"
        )
    return None
