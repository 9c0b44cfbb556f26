"""Image-folder datasets whose labels come from an explicit class list, never from folder sort order.

The reference code names DAD folders ``"0"``...``"999"`` and reads them back with ``ImageFolder``, which sorts
them as strings (``"0", "1", "10", "100", ...``) and scrambles most labels. Here a dataset is a list of
``(relative path, class index)`` pairs built from ``classes.txt``; ImageNet-V2-style integer folders map by
value. A prepared dataset folder looks like::

    root/classes.txt            one class per line: "<id>" or "<id>\\t<human name>"; index = line number
    root/train/<id>/*.png       root/val/<id>/*.png
    root/suites/<suite>/...     shifted evaluation suites
    root/manifest.json          what prepare-data wrote (counts, hashes, skipped files)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dad_core.errors import DADError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ClassList",
    "ImageFolderDataset",
    "SyntheticImageDataset",
    "create_eval_transform",
    "create_train_transform",
    "load_image",
    "open_split",
    "read_classes",
    "scan_image_folder",
    "verify_images",
    "write_classes",
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class BadImageError(DADError):
    """An image file cannot be read; the message names the file."""


@dataclass(frozen=True)
class ClassList:
    ids: tuple[str, ...]  # folder names (e.g. WordNet ids), in class-index order
    names: tuple[str, ...]  # human-readable names for prompts

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("class list has duplicate ids")
        if len(self.names) != len(self.ids):
            raise ValueError("class list: ids and names differ in length")

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        return {cid: i for i, cid in enumerate(self.ids)}


def read_classes(path: str | Path) -> ClassList:
    """Read ``classes.txt`` (``<id>`` or ``<id>\\t<name>`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path}")
    ids, names = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        cid, _, name = line.partition("\t")
        ids.append(cid.strip())
        names.append(name.strip() or cid.strip())
    return ClassList(tuple(ids), tuple(names))


def write_classes(classes: ClassList, path: str | Path) -> Path:
    from dad_core.io import atomic_write_text

    lines = [cid if cid == name else f"{cid}\t{name}" for cid, name in zip(classes.ids, classes.names, strict=True)]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def scan_image_folder(
    root: str | Path, classes: ClassList, *, integer_folders: bool = False, allow_missing: bool = True
) -> list[tuple[str, int]]:
    """List ``(relative path, class index)`` for every image under ``root/<class folder>/``.

    Args:
        root: folder with one sub-folder per class.
        classes: the class list that defines the index of each folder name.
        integer_folders: folders are named ``0``...``N-1`` and mean that class index (ImageNet-V2).
        allow_missing: a class with no folder is fine (ImageNet-R/A hold 200 of the 1000 classes).

    Returns:
        Samples sorted by class index, then file name.

    Raises:
        FileNotFoundError: ``root`` is missing.
        ValueError: a folder is not in the class list, or a class folder is missing when not allowed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    index = classes.index()
    samples: list[tuple[str, int]] = []
    seen = set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if integer_folders:
            if not folder.name.isdigit() or int(folder.name) >= len(classes):
                raise ValueError(f"{folder}: integer class folders must be 0..{len(classes) - 1}")
            label = int(folder.name)
        elif folder.name in index:
            label = index[folder.name]
        else:
            raise ValueError(f"{folder}: folder {folder.name!r} is not in the class list ({len(classes)} classes)")
        seen.add(label)
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((f"{folder.name}/{f.name}", label) for f in files)
    if not allow_missing and len(seen) != len(classes):
        missing = [classes.ids[i] for i in range(len(classes)) if i not in seen]
        raise ValueError(f"{root}: no folder for classes {missing[:10]}")
    samples.sort(key=lambda s: (s[1], s[0]))
    return samples


def open_split(data_root: str | Path, split: str, transform=None) -> ImageFolderDataset:
    """The ``train``/``val`` split of a prepared dataset, labelled by its ``classes.txt``.

    The samples are the ``<split>/<class id>/<file>`` entries of the manifest's ``files``, under ``manifest["root"]``
    (the tree itself for the digits; the referenced source folder or DVC checkout otherwise, without the files
    prepare-data skipped), ordered as :func:`~dad_core.data.scan_image_folder` orders them. A tree without a
    manifest is scanned.
    """
    data_root = Path(data_root)
    classes = read_classes(data_root / "classes.txt")
    manifest_path = data_root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    prefix = f"{split}/"
    files = [rel[len(prefix) :] for rel in manifest.get("files", {}) if rel.startswith(prefix)]
    if not files:
        return ImageFolderDataset.from_folder(data_root / split, classes, transform)
    index = classes.index()
    samples = sorted(((rel, index[rel.split("/")[0]]) for rel in files), key=lambda s: (s[1], s[0]))
    return ImageFolderDataset(data_root / manifest.get("root", ".") / split, samples, transform)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; a truncated or unreadable file raises :class:`BadImageError`."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err


def verify_images(
    root: str | Path, samples: Sequence[tuple[str, int]], on_bad_image: str = "error"
) -> tuple[list[tuple[str, int]], list[str]]:
    """Decode every image once. Returns the readable samples and the relative paths of the bad ones.

    Raises:
        BadImageError: a file is unreadable and ``on_bad_image`` is ``"error"``.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    good, bad = [], []
    for rel, label in samples:
        try:
            load_image(Path(root) / rel)
            good.append((rel, label))
        except BadImageError as err:
            if on_bad_image == "error":
                raise
            _logger.warning("skipping %s", err)
            bad.append(rel)
    return good, bad


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from an explicit sample list; labels are never inferred from sort order."""

    def __init__(self, root: str | Path, samples: Sequence[tuple[str, int]], transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        classes: ClassList,
        transform: Callable | None = None,
        *,
        integer_folders: bool = False,
        on_bad_image: str | None = None,
    ) -> ImageFolderDataset:
        """Scan ``root`` against ``classes``; with ``on_bad_image`` set, decode every file first."""
        samples = scan_image_folder(root, classes, integer_folders=integer_folders)
        if on_bad_image is not None:
            samples, _ = verify_images(root, samples, on_bad_image)
        return cls(root, samples, transform)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        rel, label = self.samples[index]
        image = load_image(self.root / rel)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class SyntheticImageDataset(Dataset):
    """Seeded random images in [0, 1] with class-dependent means: learnable, needs no files."""

    def __init__(self, num_samples: int = 64, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
        base = torch.rand(num_classes, 3, 1, 1, generator=gen)
        noise = torch.rand(num_samples, 3, image_size, image_size, generator=gen)
        self.images = (0.5 * base[self.labels] + 0.5 * noise).clamp(0, 1)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def create_eval_transform(image_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic") -> Callable:
    """Resize + center crop + to-tensor in [0, 1]. Models normalize their own input."""
    from timm.data import create_transform

    return create_transform(
        image_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1)
    )


def create_train_transform(
    image_size: int,
    *,
    randaugment: str = "",
    reprob: float = 0.0,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
) -> Callable:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing), output in [0, 1]."""
    from timm.data import create_transform

    return create_transform(
        image_size,
        is_training=True,
        auto_augment=randaugment or None,
        re_prob=reprob,
        scale=scale,
        hflip=hflip,
        interpolation=interpolation,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
