"""``dad prepare-data``: write a dataset as an image-folder tree with an explicit class list and a manifest.

Three sources, one output contract (``root`` = the output folder)::

    root/classes.txt                 class ids in index order, with human names (dad_core.data.write_classes)
    root/manifest.json               counts, per-file sha256, per-split and per-suite hashes, dataset_hash
    digits only (the files live in the tree):
    root/train/<id>/<index:04d>.png  root/val/<id>/<index:04d>.png     index = row of sklearn's load_digits()
    root/suites/<suite>/suite.json   {"name", "kind", "layout", "classes": "classes.txt", "count", ...}
    root/suites/<suite>/classes.txt  a copy of root/classes.txt, so a suite folder stands alone
    root/suites/digits-val/<id>/<index:04d>.png                          kind clean, layout class-folders
    root/suites/digits-c/<corruption>/<severity>/<id>/<index:04d>.png    kind corruption,
                                                                          layout corruption/severity/class-folders
    root/suites/digits-r/<id>/<index:04d>.png                            kind rendition, layout class-folders
    folder / dvc (the files are referenced, never copied):
    manifest["root"]                 where the images are: an absolute source path (folder), the DVC checkout in
                                     ``data.dvc_checkouts`` (dvc; one per resolved commit, reused), or ``source``,
                                     the DVC checkout inside the output folder (dvc without a checkouts folder);
                                     relative = to ``root``

``manifest["files"]`` maps every data file's path (relative to ``manifest["root"]``; skipped files left out)
to its sha256; the class of ``<split>/<id>/<file>`` is ``id``'s line in ``classes.txt``, never folder order.
``dataset_hash`` is :func:`dataset_hash` of ``{"files/<path>": sha256, ..., "classes.txt": sha256}``: the
sha256 of those sorted ``"<key>\\t<sha256>\\n"`` lines, so it depends on content only (not on versions, absolute
paths or time), and :func:`verify_dataset` checks a tree by re-hashing. The step's report (timings, images/s)
is returned, not written into the tree: the tree is byte-identical across runs with the same config and
library versions, and the CLI writes the report beside it (``<output>.report.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dad_core._version import __version__
from dad_core.config import DataConfig
from dad_core.data import ClassList, read_classes, scan_image_folder, verify_images, write_classes
from dad_core.errors import DADError
from dad_core.io import atomic_dir, atomic_write_json, sha256_file
from dad_core.progress import progress_bar

__all__ = [
    "DIGIT_CLASSES",
    "DatasetError",
    "MANIFEST",
    "dataset_hash",
    "load_manifest",
    "prepare_digits",
    "prepare_dvc",
    "prepare_folder",
    "verify_dataset",
]

_logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASSES = "classes.txt"
FORMAT = "dad-dataset/1"
DIGIT_CLASSES = ClassList(
    ids=tuple(str(i) for i in range(10)),
    names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
)
_SPLITS = ("train", "val")


class DatasetError(DADError):
    """A source tree or prepared dataset is unusable; the message names the file or folder."""


# ---------------------------------------------------------------------------------------------------------
# Hashing and the manifest
# ---------------------------------------------------------------------------------------------------------


def dataset_hash(files: dict[str, str]) -> str:
    """sha256 over the sorted ``"<path>\\t<sha256>\\n"`` lines of ``files`` (path -> file sha256)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\t{files[path]}\n".encode())
    return digest.hexdigest()


def _group_hash(files: dict[str, str], prefix: str) -> tuple[int, str]:
    group = {path: sha for path, sha in files.items() if path.startswith(prefix)}
    return len(group), dataset_hash(group)


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``root/manifest.json``.

    Args:
        root: a folder written by prepare-data.

    Returns:
        The manifest as a dict.

    Raises:
        FileNotFoundError: there is no manifest (the folder was not written by prepare-data).
        DatasetError: the manifest is not valid JSON.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"dataset manifest not found: {path} (run `dad prepare-data` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err


def verify_dataset(root: str | Path) -> dict[str, Any]:
    """Re-hash every file the manifest lists and check the dataset hash.

    Args:
        root: a folder written by prepare-data.

    Returns:
        The manifest.

    Raises:
        DatasetError: a file is missing or changed (the message names it), or the hashes disagree.
    """
    root = Path(root)
    manifest = load_manifest(root)
    data_root = root / manifest["root"]
    for rel, expected in manifest["files"].items():
        path = data_root / rel
        if not path.is_file():
            raise DatasetError(f"{path}: listed in {root / MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise DatasetError(f"{path}: content differs from {root / MANIFEST}")
    if sha256_file(root / CLASSES) != manifest["classes"]["sha256"]:
        raise DatasetError(f"{root / CLASSES}: content differs from {root / MANIFEST}")
    if _dataset_hash(manifest["files"], manifest["classes"]["sha256"]) != manifest["dataset_hash"]:
        raise DatasetError(f"{root / MANIFEST}: dataset_hash does not match the listed files")
    return manifest


def _dataset_hash(files: dict[str, str], classes_sha: str) -> str:
    return dataset_hash({**{f"files/{k}": v for k, v in files.items()}, CLASSES: classes_sha})


def _manifest(
    source: dict[str, Any], root: str, classes: ClassList, classes_sha: str, files: dict[str, str]
) -> dict[str, Any]:
    splits = {}
    for split in _SPLITS:
        count, digest = _group_hash(files, f"{split}/")
        per_class = Counter(rel.split("/")[1] for rel in files if rel.startswith(f"{split}/"))
        splits[split] = {"count": count, "sha256": digest, "per_class": {cid: per_class[cid] for cid in classes.ids}}
    return {
        "format": FORMAT,
        "source": source,
        "root": root,
        "classes": {"file": CLASSES, "sha256": classes_sha, "ids": list(classes.ids), "names": list(classes.names)},
        "splits": splits,
        "files": files,
        "dataset_hash": _dataset_hash(files, classes_sha),
        "version": __version__,
    }


def _report(manifest: dict[str, Any], output: Path, started: float, images: int, **extra: Any) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {
        "output": str(output),
        "manifest": str(output / MANIFEST),
        "source": manifest["source"],
        "num_classes": len(manifest["classes"]["ids"]),
        "counts": {split: info["count"] for split, info in manifest["splits"].items()},
        "dataset_hash": manifest["dataset_hash"],
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------
# Digits: scikit-learn's 1,797 real 8x8 digits, upscaled, split, and shifted into evaluation suites
# ---------------------------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG with fixed options and no metadata chunks (Pillow writes no time stamp): same array, same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


class _TreeWriter:
    """Writes PNGs and small files under a folder and remembers each file's sha256 by relative path."""

    def __init__(self, root: Path, bar: tqdm) -> None:
        self.root, self.bar = root, bar
        self.files: dict[str, str] = {}

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[rel] = hashlib.sha256(data).hexdigest()

    def write_png(self, rel: str, image: np.ndarray) -> None:
        self.write_bytes(rel, _png_bytes(image))
        self.bar.update(1)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``uint8 [N, S, S, 3]`` (white on black, bicubic upscaling) and labels ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # sklearn's values are 0..16
    size = (image_size, image_size)
    images = np.stack(
        [np.asarray(Image.fromarray(g).resize(size, Image.Resampling.BICUBIC).convert("RGB")) for g in gray]
    )
    return images, digits.target.astype(np.int64)


def _split_digits(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices (sorted), reproducible from ``seed``."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels, shuffle=True
    )
    return np.sort(train), np.sort(val)


def _suite_members(labels: np.ndarray, val: np.ndarray, per_class: int) -> np.ndarray:
    """The held-out indices used by the shifted suites: all, or the first ``per_class`` of each class."""
    if per_class <= 0:
        return val
    return np.sort(np.concatenate([val[labels[val] == c][:per_class] for c in np.unique(labels)]))


def _stream(*parts: int | str) -> np.random.Generator:
    """An independent generator per (suite seed, transform, severity, image): order and subsets don't matter."""
    return np.random.default_rng([zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts])


def _suite_json(name: str, kind: str, layout: str, count: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "layout": layout, "classes": CLASSES, "count": count, **extra}


def _write_corruption_suite(
    tree: _TreeWriter, images: np.ndarray, labels: np.ndarray, members: np.ndarray, seed: int
) -> dict[str, Any]:
    """digits-c: every held-out member under each of the 15 corruptions at severities 1-5."""
    from dad_core.corruptions import CORRUPTION_NAMES, SEVERITIES, corrupt

    for name in CORRUPTION_NAMES:
        for severity in SEVERITIES:
            for i in members:
                out = corrupt(images[i], name, severity, _stream(seed, name, severity, int(i)))
                tree.write_png(f"suites/digits-c/{name}/{severity}/{DIGIT_CLASSES.ids[labels[i]]}/{i:04d}.png", out)
    count = len(members) * len(CORRUPTION_NAMES) * len(SEVERITIES)
    return _suite_json(
        "digits-c",
        "corruption",
        "corruption/severity/class-folders",
        count,
        corruptions=list(CORRUPTION_NAMES),
        severities=list(SEVERITIES),
        source_split="val",
        suite_seed=seed,
    )


def _write_rendition_suite(
    tree: _TreeWriter, images: np.ndarray, labels: np.ndarray, members: np.ndarray, seed: int
) -> dict[str, Any]:
    """digits-r: each held-out member drawn in one style; a balanced, seeded assignment recorded per file."""
    from dad_core.corruptions import RENDITION_NAMES, apply_rendition

    styles = _stream(seed, "digits-r").permutation(np.arange(len(members)) % len(RENDITION_NAMES))
    assignment = {}
    for i, style in zip(members, styles, strict=True):
        rel, name = f"{DIGIT_CLASSES.ids[labels[i]]}/{i:04d}.png", RENDITION_NAMES[style]
        assignment[rel] = name
        tree.write_png(f"suites/digits-r/{rel}", apply_rendition(images[i], name, _stream(seed, name, int(i))))
    return _suite_json(
        "digits-r",
        "rendition",
        "class-folders",
        len(members),
        renditions=list(RENDITION_NAMES),
        assignment=assignment,
        source_split="val",
        suite_seed=seed,
    )


def _write_digit_suites(
    tree: _TreeWriter, images: np.ndarray, labels: np.ndarray, val: np.ndarray, cfg: DataConfig, classes_txt: bytes
) -> dict[str, dict[str, Any]]:
    """digits-val (the clean held-out split), digits-c and digits-r, each with suite.json and classes.txt."""
    for i in val:
        tree.write_png(f"suites/digits-val/{DIGIT_CLASSES.ids[labels[i]]}/{i:04d}.png", images[i])
    members = _suite_members(labels, val, cfg.suite_per_class)
    specs = {
        "digits-val": _suite_json("digits-val", "clean", "class-folders", len(val), source_split="val"),
        "digits-c": _write_corruption_suite(tree, images, labels, members, cfg.suite_seed),
        "digits-r": _write_rendition_suite(tree, images, labels, members, cfg.suite_seed),
    }
    for name, spec in specs.items():
        tree.write_json(f"suites/{name}/suite.json", spec)
        tree.write_bytes(f"suites/{name}/{CLASSES}", classes_txt)
    return specs


def _suite_entries(specs: dict[str, dict[str, Any]], files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The manifest's view of each suite: where it is, what it is, and the hash of its files."""
    keys = ("kind", "layout", "count")
    return {
        name: {
            "path": f"suites/{name}",
            **{k: spec[k] for k in keys},
            "sha256": _group_hash(files, f"suites/{name}/")[1],
        }
        for name, spec in specs.items()
    }


def prepare_digits(output_root: str | Path, cfg: DataConfig, *, progress: bool = True) -> dict[str, Any]:
    """Write scikit-learn's handwritten digits as an image-folder dataset with shifted evaluation suites.

    The layout is in the module docstring. Same ``cfg`` (``image_size``, ``val_fraction``, ``seed``,
    ``suite_seed``, ``suite_per_class``) and library versions: byte-identical output.

    Args:
        output_root: the dataset folder; replaced atomically if it exists.
        cfg: data settings.
        progress: show a progress bar (else a progress log line every 30 s).

    Returns:
        The report: counts per split and suite, ``dataset_hash``, output paths, seconds and images/s.
    """
    from dad_core.corruptions import CORRUPTION_NAMES, SEVERITIES

    started = time.perf_counter()
    output_root = Path(output_root)
    images, labels = _load_digits(cfg.image_size)
    train, val = _split_digits(labels, cfg.val_fraction, cfg.seed)
    num_members = len(_suite_members(labels, val, cfg.suite_per_class))
    total = len(labels) + len(val) + num_members * (len(CORRUPTION_NAMES) * len(SEVERITIES) + 1)
    with (
        atomic_dir(output_root) as tmp,
        progress_bar(total=total, unit="img", desc="prepare-data", enabled=progress) as bar,
    ):
        tree = _TreeWriter(tmp, bar)
        classes_txt = write_classes(DIGIT_CLASSES, tmp / CLASSES).read_bytes()
        for split, indices in (("train", train), ("val", val)):
            for i in indices:
                tree.write_png(f"{split}/{DIGIT_CLASSES.ids[labels[i]]}/{i:04d}.png", images[i])
        specs = _write_digit_suites(tree, images, labels, val, cfg, classes_txt)
        source = {"kind": "digits", "name": "sklearn.datasets.load_digits", "num_images": len(labels)}
        manifest = _manifest(source, ".", DIGIT_CLASSES, hashlib.sha256(classes_txt).hexdigest(), tree.files)
        settings = ("image_size", "val_fraction", "seed", "suite_seed", "suite_per_class")
        manifest.update({key: getattr(cfg, key) for key in settings})
        manifest["suites"] = _suite_entries(specs, tree.files)
        atomic_write_json(tmp / MANIFEST, manifest)
    suites = {name: info["count"] for name, info in manifest["suites"].items()}
    _logger.info("digits: %s -> %s (dataset_hash %s)", manifest["splits"], output_root, manifest["dataset_hash"][:12])
    return _report(manifest, output_root, started, total, suites=suites, skipped=[])


# ---------------------------------------------------------------------------------------------------------
# ImageNet-style folders, local or from a DVC revision: validated and referenced, never copied
# ---------------------------------------------------------------------------------------------------------


def _source_classes(source_dir: Path, classes_file: str | Path | None) -> ClassList:
    """The explicit class list: ``classes_file``, else ``source_dir/classes.txt``, else sorted train folders."""
    if classes_file is not None:
        return read_classes(classes_file)
    if (source_dir / CLASSES).is_file():
        return read_classes(source_dir / CLASSES)
    ids = tuple(sorted(p.name for p in (source_dir / "train").iterdir() if p.is_dir()))
    if not ids:
        raise DatasetError(f"{source_dir / 'train'}: no class folders")
    return ClassList(ids, ids)


def _verify_split(
    source_dir: Path, split: str, classes: ClassList, on_bad_image: str, bar: tqdm
) -> tuple[list[str], list[str]]:
    """Relative paths (``split/<id>/<file>``) of the readable images of one split, and of the bad ones."""
    try:
        samples = scan_image_folder(source_dir / split, classes)
    except ValueError as err:
        raise DatasetError(f"{err} (class list: {CLASSES} in the source, --classes, or the train folders)") from err
    good, bad = [], []
    for start in range(0, len(samples), 256):  # chunks keep the progress bar moving
        ok, skipped = verify_images(source_dir / split, samples[start : start + 256], on_bad_image)
        good += [f"{split}/{rel}" for rel, _ in ok]
        bad += [f"{split}/{rel}" for rel in skipped]
        bar.update(len(samples[start : start + 256]))
    return good, bad


def _hash_files(root: Path, rels: Iterable[str]) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in rels}


def _prepare_folder_into(
    out: Path,
    source_dir: Path,
    root_ref: str,
    cfg: DataConfig,
    classes_file: str | Path | None,
    progress: bool,
    source: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """Validate ``source_dir`` and write ``classes.txt`` and ``manifest.json`` into ``out``."""
    if not (source_dir / "train").is_dir():
        raise FileNotFoundError(f"{source_dir}: expected an ImageNet-style tree with train/<class>/ (and val/)")
    classes = _source_classes(source_dir, classes_file)
    splits = [s for s in _SPLITS if (source_dir / s).is_dir()]
    good: list[str] = []
    bad: list[str] = []
    with progress_bar(unit="img", desc="verify images", enabled=progress) as bar:
        for split in splits:
            ok, skipped = _verify_split(source_dir, split, classes, cfg.on_bad_image, bar)
            good, bad = good + ok, bad + skipped
    if not good:
        raise DatasetError(f"{source_dir}: no readable images under {', '.join(splits)}")
    classes_sha = sha256_file(write_classes(classes, out / CLASSES))
    manifest = _manifest(source, root_ref, classes, classes_sha, _hash_files(source_dir, good))
    manifest.update(skipped=bad, on_bad_image=cfg.on_bad_image)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest, bad


def prepare_folder(
    source_dir: str | Path,
    output_root: str | Path,
    cfg: DataConfig,
    *,
    classes_file: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate an ImageNet-style tree and write ``classes.txt`` + a manifest that references its files.

    Args:
        source_dir: ``train/<class id>/*`` and optionally ``val/<class id>/*``; may hold ``classes.txt``.
        output_root: the dataset folder (classes.txt, manifest.json); replaced atomically if it exists.
        cfg: data settings; ``on_bad_image`` decides between failing and skipping unreadable files.
        classes_file: explicit class list; default ``source_dir/classes.txt``, else the sorted train folders.
        progress: show a progress bar (else a progress log line every 30 s).

    Returns:
        The report: counts per split, skipped files, ``dataset_hash``, output paths, seconds and images/s.

    Raises:
        FileNotFoundError: ``source_dir`` or its ``train/`` folder is missing.
        DatasetError: a folder is not in the class list, or no image is readable.
        BadImageError: an image is unreadable and ``cfg.on_bad_image`` is ``"error"`` (names the file).
    """
    started = time.perf_counter()
    source_dir, output_root = Path(source_dir).resolve(), Path(output_root)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder not found: {source_dir}")
    with atomic_dir(output_root) as tmp:
        source = {"kind": "folder", "path": str(source_dir)}
        manifest, bad = _prepare_folder_into(tmp, source_dir, str(source_dir), cfg, classes_file, progress, source)
    return _report(manifest, output_root, started, len(manifest["files"]) + len(bad), skipped=bad)


def prepare_dvc(
    repo: str,
    rev: str | None,
    path: str,
    output_root: str | Path,
    cfg: DataConfig,
    *,
    classes_file: str | Path | None = None,
    progress: bool = True,
    checkouts: str | Path | None = None,
) -> dict[str, Any]:
    """Check out ``path`` at ``rev`` of a DVC repository and prepare it as a folder.

    Args:
        repo: git URL or local path of the DVC repository.
        rev: git revision (tag, branch, commit); None = the default branch / working tree.
        path: the ImageNet-style tree inside the repository.
        output_root: the dataset folder (classes.txt, manifest.json).
        cfg: data settings.
        classes_file: explicit class list (see :func:`prepare_folder`).
        progress: show a progress bar (else a progress log line every 30 s).
        checkouts: a folder keeping one checkout per repository and resolved commit
            (``<checkouts>/<repo key>/<commit>/<path>``): the first run of a commit downloads it there, later runs
            reuse it, and ``manifest["root"]`` points at it, so the dataset is never copied again. None: the files
            go into ``output_root/source`` and ``manifest["root"]`` is ``source``.

    Returns:
        The report of :func:`prepare_folder`, with ``source`` naming repo, rev, path, the resolved commit and, with
        ``checkouts``, the ``checkout`` folder and whether it was ``reused``.

    Raises:
        DatasetError: the repository, revision or path cannot be read (the message names them).
    """
    started = time.perf_counter()
    output_root = Path(output_root)
    source = {"kind": "dvc", "repo": repo, "rev": rev, "path": path}
    if checkouts is not None:
        checkout, resolved = _dvc_checkout(repo, rev, path, Path(checkouts))
        source.update(resolved, checkout=str(checkout))
        with atomic_dir(output_root) as tmp:
            manifest, bad = _prepare_folder_into(tmp, checkout, str(checkout), cfg, classes_file, progress, source)
    else:
        with atomic_dir(output_root) as tmp:
            source.update(_dvc_get(repo, rev, path, tmp / "source"))
            manifest, bad = _prepare_folder_into(tmp, tmp / "source", "source", cfg, classes_file, progress, source)
    return _report(manifest, output_root, started, len(manifest["files"]) + len(bad), skipped=bad)


def _dvc_checkout(repo: str, rev: str | None, path: str, checkouts: Path) -> tuple[Path, dict[str, Any]]:
    """The checkout of ``path`` at the commit ``rev`` resolves to, under ``checkouts``: made once, then reused.

    A checkout is downloaded next to its place and renamed into it when complete, so a folder at the place is always
    whole; of two runs checking out the same commit at once, the first rename wins and the other run uses it.
    """
    with _dvc_errors(repo, rev, path):
        fs = _dvc_fs(repo, rev)
        commit = fs.repo.get_rev()  # the commit ``rev`` resolved to (scm.get_rev() would be the clone's HEAD)
    name = Path(str(repo).rstrip("/")).name.removesuffix(".git") or "repo"
    key = f"{name}-{hashlib.sha256(str(repo).encode()).hexdigest()[:12]}"
    target = checkouts / key / commit / path.strip("/")
    if target.is_dir():
        _logger.info("dvc: %s at %s is checked out already: %s", path, commit[:12], target)
        return target, {"commit": commit, "reused": True}
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}-{time.monotonic_ns()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _dvc_errors(repo, rev, path):
            _dvc_download(fs, path, partial, repo, rev)
        try:
            partial.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            _logger.info("dvc: another run checked out %s at %s first; using it", path, commit[:12])
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, {"commit": commit, "reused": False}


def _dvc_fs(repo: str, rev: str | None) -> Any:
    from dvc.api import DVCFileSystem

    return DVCFileSystem(repo, rev=rev)


@contextlib.contextmanager
def _dvc_errors(repo: str, rev: str | None, path: str) -> Iterator[None]:
    """DVC's and scmrepo's many error types (RevError, CloneError, NoRemoteError, ...) as one DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the repository, revision and path named
        where = f"{path!r} at revision {rev or '(default)'} of DVC repository {repo}"
        raise DatasetError(f"cannot read {where}: {type(err).__name__}: {err}") from err


def _dvc_download(fs: Any, path: str, target: Path, repo: str, rev: str | None) -> None:
    if not fs.isdir(path):
        raise DatasetError(f"{path!r} at revision {rev or '(default)'} of DVC repository {repo}: not a folder in it")
    fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)


def _dvc_get(repo: str, rev: str | None, path: str, target: Path) -> dict[str, Any]:
    """Copy ``path`` at ``rev`` into ``target`` with ``dvc.api.DVCFileSystem``; returns the resolved commit."""
    try:
        with _dvc_errors(repo, rev, path):
            fs = _dvc_fs(repo, rev)
            _dvc_download(fs, path, target, repo, rev)
            return {"commit": fs.repo.get_rev()}
    except DatasetError:
        shutil.rmtree(target, ignore_errors=True)
        raise
