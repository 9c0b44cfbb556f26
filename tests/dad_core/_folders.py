"""Test data: an ImageNet-style folder tree with numbered classes (``train/<k>/``, ``val/<k>/``), where class k
is readable from the pixels. Numbered folders are the ImageFolder sort-order trap: ``10`` sorts before ``2``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_numbered_folders(
    root: Path, num_classes: int, *, train_per_class: int, block: int, class_names: bool
) -> Path:
    """Random 32x32 PNGs with the top-left ``block`` x ``block`` pixels set to ``20 * k``, 2 val images per class,
    and ``classes.txt`` in numeric order (``k`` per line, or ``k<TAB>number k`` with ``class_names``)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", 2)):
        for k in range(num_classes):
            folder = root / split / str(k)
            folder.mkdir(parents=True)
            for j in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[:block, :block] = 20 * k
                Image.fromarray(pixels).save(folder / f"img{j:02d}.png")
    lines = (f"{k}\tnumber {k}\n" if class_names else f"{k}\n" for k in range(num_classes))
    (root / "classes.txt").write_text("".join(lines))
    return root
