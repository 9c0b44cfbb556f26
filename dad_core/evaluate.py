"""Clean and out-of-distribution evaluation: named suites of image folders, exact top-1/top-5, mCE, a report.

A *suite* is a folder of images in one of three layouts, always labelled through the explicit class list
(``classes.txt``), never through folder sort order:

- ``class-folders``: ``<suite>/<class id>/*`` (ImageNet val, Sketch, Stylized, R, A; the digits suites);
- ``integer-folders``: ``<suite>/<0..N-1>/*``, folders meaning class indices by value (ImageNet-V2's release);
- ``corruption/severity/class-folders``: ``<suite>/<corruption>/<severity>/<class id>/*`` (ImageNet-C, digits-C).

A suite may restrict the logits to a subset of the classes (ImageNet-R/A: 200 WordNet ids) and may carry
per-corruption baseline errors (ImageNet-C: AlexNet's) that normalize the corruption error, and the baseline's
clean error (AlexNet's 43.45 %) for the relative CE. The ImageNet suites live at fixed paths under a root
(:data:`IMAGENET_SUITES`); any other suite describes itself with a ``suite.json`` in its folder (``{"name", "kind",
"layout"}``, optionally ``"subset"``, ``"baseline_errors"`` and ``"baseline_clean_error"``), which is how the
embedded digits suites are found. Both kinds run through the same code.

Protocol (DESIGN 3.6; the DAD reference's easyrobust benchmarks): top-1/top-5 accuracy everywhere; for a class
subset, the logits are restricted to the subset's classes (kept in class-list order, which is sorted WordNet-id
order for ImageNet) and labels are re-indexed into that order. For corruptions (Hendrycks & Dietterich, ICLR 2019,
section 3): ``CE_c = sum_s E_s,c / sum_s E^AlexNet_s,c`` over the five severities, ``mCE = 100 * mean_c CE_c``,
and the relative ``CE_c = sum_s (E_s,c - E_clean) / sum_s (E^AlexNet_s,c - E^AlexNet_clean)``. The baseline holds
AlexNet's mean over the five severities, so a CE exists only for a corruption with all five severities present; one
with severities missing is flagged not comparable, reported with its raw mean error and left out of every mCE.
Beside the normalized numbers (and alone without a baseline, as for digits-C) the unnormalized mean corruption
error ``mce_unnormalized = mean_c err_c`` is reported, and ``relative_mce_unnormalized = mean_c (err_c -
clean_err)`` when a clean suite ran. An mCE over fewer corruptions than the benchmark's 15 (the baseline's set)
is reported under its own ``*_partial`` key with ``mce_corruptions``, never as the mCE. A suite that is absent is
reported as ``{"status": "skipped", "reason": ...}``, never as zero, and stays out of every mean.

Counts are exact under ``torch.distributed``: rank ``r`` of ``W`` scores samples ``r, r + W, ...`` (disjoint,
no padded duplicates, unlike ``DistributedSampler``) and the correct counts are summed with ``all_reduce``.
All accuracies are percentages.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from dad_core.config import DADConfig
from dad_core.data import ClassList, ImageFolderDataset, create_eval_transform, read_classes, scan_image_folder
from dad_core.distributed import is_primary
from dad_core.errors import DADError
from dad_core.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "IMAGENET_SUITES",
    "KINDS",
    "LAYOUTS",
    "SEVERITIES",
    "SuiteSpec",
    "discover_suites",
    "evaluate_ood",
    "evaluate_suites",
    "flat_metrics",
    "flatten_metrics",
    "imagenet_suite",
    "load_alexnet_errors",
    "load_suite_spec",
    "load_wnids",
    "resolve_eval_transform",
    "resolve_suites",
    "save_report",
    "shard_indices",
    "summarize",
]

_logger = logging.getLogger(__name__)

CLASS_FOLDERS = "class-folders"
INTEGER_FOLDERS = "integer-folders"
CORRUPTION_FOLDERS = "corruption/severity/class-folders"
LAYOUTS = (CLASS_FOLDERS, INTEGER_FOLDERS, CORRUPTION_FOLDERS)
KINDS = ("clean", "shift", "rendition", "corruption")  # clean: the in-distribution reference; the rest are OOD
SEVERITIES = ("1", "2", "3", "4", "5")  # ImageNet-C's severity folders; a corruption's CE needs all five
# AlexNet's top-1 error on the clean ImageNet val set (43.45 %, shown as 43.5 in Hendrycks & Dietterich, ICLR 2019,
# Table 1): E^AlexNet_clean in the denominator of the relative CE. The per-corruption errors are in
# resources/alexnet_imagenet_c_errors.json (the same 15 values as AugMix's ALEXNET_ERR).
ALEXNET_CLEAN_ERROR = 0.4345

REPORT_JSON, REPORT_MD, REPORT_PNG = "eval_report.json", "eval_report.md", "accuracy.png"


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: where its images are and how they are scored."""

    name: str
    path: Path  # the suite folder (its layout below)
    kind: str = "shift"  # clean | shift | rendition | corruption; every kind but clean counts as OOD
    layout: str = CLASS_FOLDERS
    subset: tuple[str, ...] | None = None  # class ids the logits are restricted to (ImageNet-R/A); None = all
    # per-corruption error (fraction) normalizing CE; None = unnormalized. compare=False: a dict cannot be hashed
    baseline_errors: Mapping[str, float] | None = field(default=None, compare=False)
    baseline_clean_error: float | None = None  # the baseline's clean error (fraction) for the relative CE

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"suite {self.name}: unsupported kind {self.kind!r} (one of {list(KINDS)})")
        if self.layout not in LAYOUTS:
            raise ValueError(f"suite {self.name}: unsupported layout {self.layout!r} (one of {list(LAYOUTS)})")
        if self.baseline_errors is not None and self.layout != CORRUPTION_FOLDERS:
            raise ValueError(f"suite {self.name}: baseline_errors needs layout {CORRUPTION_FOLDERS!r}")
        if self.baseline_errors is not None and not all(0 < v <= 1 for v in self.baseline_errors.values()):
            raise ValueError(f"suite {self.name}: baseline errors are fractions in (0, 1]")
        if self.baseline_clean_error is not None:
            if self.baseline_errors is None:
                raise ValueError(f"suite {self.name}: baseline_clean_error needs baseline_errors")
            if not 0 <= self.baseline_clean_error < min(self.baseline_errors.values()):
                raise ValueError(
                    f"suite {self.name}: baseline_clean_error must be a fraction below every baseline error "
                    "(the relative CE divides by their difference)"
                )


class _Registered(NamedTuple):
    path: str  # relative to the suites root
    kind: str
    layout: str = CLASS_FOLDERS
    subset: str | None = None  # package resource holding the class ids
    baseline: bool = False  # normalize CE by AlexNet's ImageNet-C errors


_IMAGENET = {
    "imagenet-val": _Registered("imagenet/val", "clean"),
    "imagenet-v2": _Registered("imagenetv2", "shift", INTEGER_FOLDERS),
    "imagenet-r": _Registered("imagenet-r", "rendition", subset="imagenet_r_wnids.txt"),
    "imagenet-sketch": _Registered("imagenet-sketch", "rendition"),
    "imagenet-a": _Registered("imagenet-a", "shift", subset="imagenet_a_wnids.txt"),
    "stylized": _Registered("stylized-imagenet", "rendition"),
    "imagenet-c": _Registered("imagenet-c", "corruption", CORRUPTION_FOLDERS, baseline=True),
}
IMAGENET_SUITES = tuple(_IMAGENET)  # the registered names; "imagenet" in resolve_suites means all of them


def _resource(filename: str) -> str:
    return resources.files("dad_core.resources").joinpath(filename).read_text()


def load_wnids(suite: str) -> tuple[str, ...]:
    """The sorted WordNet ids of a 200-class ImageNet subset, ``"imagenet-r"`` or ``"imagenet-a"``."""
    if suite not in ("imagenet-r", "imagenet-a"):
        raise ValueError(f"no class subset for suite {suite!r} (imagenet-r or imagenet-a)")
    return tuple(line.strip() for line in _resource(_IMAGENET[suite].subset).splitlines() if line.strip())


def load_alexnet_errors() -> dict[str, float]:
    """AlexNet's ImageNet-C top-1 error per corruption (fraction, averaged over severities; the CE denominators)."""
    return dict(json.loads(_resource("alexnet_imagenet_c_errors.json"))["errors"])


def imagenet_suite(name: str, root: str | Path) -> SuiteSpec:
    """The registered ImageNet suite ``name`` (one of :data:`IMAGENET_SUITES`) under the suites ``root``."""
    if name not in _IMAGENET:
        raise ValueError(f"unknown ImageNet suite {name!r} (one of {list(IMAGENET_SUITES)})")
    entry = _IMAGENET[name]
    return SuiteSpec(
        name,
        Path(root) / entry.path,
        entry.kind,
        entry.layout,
        subset=load_wnids(name) if entry.subset else None,
        baseline_errors=load_alexnet_errors() if entry.baseline else None,
        baseline_clean_error=ALEXNET_CLEAN_ERROR if entry.baseline else None,
    )


def load_suite_spec(folder: str | Path) -> SuiteSpec:
    """Read ``folder/suite.json``: ``name`` (default: the folder name), ``kind``, ``layout`` (default class-folders),
    optional ``subset`` (class ids), ``baseline_errors`` ({corruption: error fraction}) and ``baseline_clean_error``
    (fraction). Other keys are ignored.

    Args:
        folder: the suite folder holding ``suite.json`` and the images.

    Returns:
        The suite, rooted at ``folder``.

    Raises:
        DADError: the file is not valid JSON or holds a bad value; the message names the file.
    """
    folder = Path(folder)
    path = folder / "suite.json"
    try:
        meta = json.loads(path.read_text())
        subset = meta.get("subset")
        return SuiteSpec(
            str(meta.get("name", folder.name)),
            folder,
            meta["kind"],
            meta.get("layout", CLASS_FOLDERS),
            subset=tuple(subset) if subset is not None else None,
            baseline_errors=meta.get("baseline_errors"),
            baseline_clean_error=meta.get("baseline_clean_error"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DADError(f"{path}: not a valid suite description ({type(err).__name__}: {err})") from err


def discover_suites(root: str | Path) -> list[SuiteSpec]:
    """Every suite under ``root`` that describes itself with a ``suite.json``, in folder-name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [load_suite_spec(p) for p in sorted(root.iterdir()) if (p / "suite.json").is_file()]


def resolve_suites(root: str | Path, names: Sequence[str] = ("auto",)) -> list[SuiteSpec]:
    """Turn suite names into specs under the suites ``root``.

    ``auto`` means every registered ImageNet suite whose folder exists plus every ``suite.json`` suite (clean first);
    ``imagenet`` means all registered ImageNet suites (absent ones are reported as skipped); a registered name is
    that suite; any other name is the ``suite.json`` suite of that name, else ``<root>/<name>`` read as class
    folders and scored as a shift (skipped when the folder is absent). Duplicates are dropped.
    """
    root = Path(root)
    described = {spec.name: spec for spec in discover_suites(root)}
    specs: dict[str, SuiteSpec] = {}
    for name in names:
        if name == "auto":
            found = [imagenet_suite(n, root) for n in IMAGENET_SUITES if (root / _IMAGENET[n].path).is_dir()]
            candidates = found + sorted(described.values(), key=lambda spec: spec.kind != "clean")  # clean first
        elif name == "imagenet":
            candidates = [imagenet_suite(n, root) for n in IMAGENET_SUITES]
        elif name in _IMAGENET:
            candidates = [imagenet_suite(name, root)]
        else:
            candidates = [described.get(name) or SuiteSpec(name, root / name)]
        for spec in candidates:
            specs.setdefault(spec.name, spec)
    return list(specs.values())


def resolve_eval_transform(
    model: nn.Module, crop_pct: float | None = None, interpolation: str | None = None
) -> tuple[float, str]:
    """Test-time ``(crop_pct, interpolation)``: the given values, else the first timm ``pretrained_cfg`` found on
    ``model`` or its sub-modules (DESIGN 3.6), else ``(1.0, "bicubic")``."""
    cfg = next((m.pretrained_cfg for m in model.modules() if isinstance(getattr(m, "pretrained_cfg", None), dict)), {})
    crop = crop_pct if crop_pct is not None else float(cfg.get("crop_pct") or 1.0)
    return crop, interpolation or cfg.get("interpolation") or "bicubic"


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """The samples rank ``rank`` scores: ``rank, rank + world_size, ...``. Over all ranks the shards are disjoint
    and cover every sample exactly once (no padding with duplicates)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return range(rank, num_samples, world_size)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _skipped(spec: SuiteSpec, reason: str) -> dict[str, Any]:
    _logger.warning("suite %s skipped: %s", spec.name, reason)
    return {"status": "skipped", "kind": spec.kind, "reason": reason}


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


@dataclass
class _Scorer:
    """Scores one image folder against the class list; shared by every suite of a run."""

    model: nn.Module
    classes: ClassList
    transform: Any
    batch_size: int
    device: torch.device
    num_workers: int
    progress: bool

    def samples(self, folder: Path, spec: SuiteSpec) -> tuple[list[tuple[str, int]], torch.Tensor | None]:
        """``(relative path, label)`` pairs, labels re-indexed into the subset, and the subset's logit indices."""
        try:
            samples = scan_image_folder(folder, self.classes, integer_folders=spec.layout == INTEGER_FOLDERS)
        except ValueError as err:
            raise DADError(f"suite {spec.name}: {err}") from err
        if spec.subset is None:
            return samples, None
        index = self.classes.index()
        unknown = [cid for cid in spec.subset if cid not in index]
        if unknown:
            raise DADError(f"suite {spec.name}: subset classes {unknown[:5]} are not in the class list")
        kept = sorted({index[cid] for cid in spec.subset})  # class-list order = sorted wnids for ImageNet
        position = {full: i for i, full in enumerate(kept)}
        outside = sorted({rel.split("/")[0] for rel, label in samples if label not in position})
        if outside:
            raise DADError(f"suite {spec.name}: folders {outside[:5]} are not among its {len(kept)} classes")
        return [(rel, position[label]) for rel, label in samples], torch.tensor(kept, device=self.device)

    @torch.inference_mode()
    def count(self, dataset: ImageFolderDataset, subset_index: torch.Tensor | None) -> tuple[int, int, int]:
        """``(images, top-1 correct, top-5 correct)`` over the whole dataset, summed over ranks."""
        rank, world = _world()
        part = Subset(dataset, shard_indices(len(dataset), rank, world))
        loader = DataLoader(part, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        totals = torch.zeros(3, dtype=torch.int64, device=self.device)
        for images, labels in loader:
            logits = self.model(images.to(self.device))
            if logits.ndim != 2 or logits.shape[1] != len(self.classes):
                raise DADError(
                    f"the model returns logits of shape {list(logits.shape)}, "
                    f"but the class list has {len(self.classes)} classes"
                )
            if subset_index is not None:
                logits = logits[:, subset_index]  # restrict, then rank only the suite's classes
            labels = labels.to(self.device)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            totals += torch.stack([torch.tensor(len(labels), device=self.device), hits[:, 0].sum(), hits.any(1).sum()])
        if world > 1:
            dist.all_reduce(totals)
        return tuple(totals.tolist())

    def score(self, folder: Path, spec: SuiteSpec) -> dict[str, Any] | None:
        """``{"top1", "top5" (5+ classes), "count"}`` for one folder of class folders; None when it has no images."""
        samples, subset_index = self.samples(folder, spec)
        if not samples:
            return None
        count, correct1, correct5 = self.count(ImageFolderDataset(folder, samples, self.transform), subset_index)
        scores: dict[str, Any] = {"top1": 100.0 * correct1 / count}
        if (len(subset_index) if subset_index is not None else len(self.classes)) >= 5:
            scores["top5"] = 100.0 * correct5 / count
        scores["count"] = count
        if self.progress and is_primary():
            where = " s".join(folder.relative_to(spec.path).parts) or folder.name  # "gaussian_noise s1"
            _logger.info("%s %s: top-1 %.2f over %d images", spec.name, where, scores["top1"], count)
        return scores


def _subfolders(path: Path) -> list[Path]:
    """Sub-folders, numeric names by value (severity "10" after "2")."""

    def key(p: Path) -> tuple[bool, int, str]:
        return (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)

    return sorted((p for p in path.iterdir() if p.is_dir()), key=key)


def _score_corruption(scorer: _Scorer, spec: SuiteSpec, folder: Path) -> dict[str, Any] | None:
    """One corruption: accuracy and error averaged over the severities present, each severity's scores, and, when
    all five severities are there and the suite has a baseline, its CE (else it is flagged not comparable)."""
    severities = {p.name: s for p in _subfolders(folder) if (s := scorer.score(p, spec)) is not None}
    if not severities:
        return None
    entry: dict[str, Any] = {"top1": _mean([s["top1"] for s in severities.values()])}
    if all("top5" in s for s in severities.values()):
        entry["top5"] = _mean([s["top5"] for s in severities.values()])
    entry["error"] = 100.0 - entry["top1"]  # the raw mean error over the severities present
    missing = [s for s in SEVERITIES if s not in severities]
    unexpected = sorted(set(severities) - set(SEVERITIES))
    entry["comparable"] = not missing and not unexpected
    if missing:
        entry["severities_missing"] = missing
    if unexpected:
        entry["severities_unexpected"] = unexpected
    if entry["comparable"] and spec.baseline_errors is not None:
        # CE_c = sum_s E_s,c / sum_s E^AlexNet_s,c. The baseline is AlexNet's mean over the five severities, so with
        # all five present CE_c = mean_s E_s,c / baseline_c; error is in %, so this is already CE_c x 100. With a
        # severity missing, AlexNet's sum over the same severities is unknown, so there is no CE: dividing by the
        # five-severity mean gave 112.8 for all wrong at gaussian_noise severity 1 alone, where the sums give ~144.
        baseline = spec.baseline_errors[folder.name]
        entry["ce"] = entry["error"] / baseline
        entry["baseline_error"] = 100.0 * baseline
    entry["count"] = sum(s["count"] for s in severities.values())
    entry["severities"] = severities
    return entry


def _evaluate_corruptions(scorer: _Scorer, spec: SuiteSpec) -> dict[str, Any]:
    """Every corruption folder of a corruption suite: accuracy over all of them, mCE over the comparable ones."""
    folders = _subfolders(spec.path)
    if spec.baseline_errors is not None:
        ignored = [p.name for p in folders if p.name not in spec.baseline_errors]
        if ignored:
            _logger.warning("suite %s: no baseline error for %s; left out of mCE and means", spec.name, ignored)
        folders = [p for p in folders if p.name in spec.baseline_errors]
    corruptions = {p.name: c for p in folders if (c := _score_corruption(scorer, spec, p)) is not None}
    if not corruptions:
        return _skipped(spec, f"no images under {spec.path}")
    result: dict[str, Any] = {"status": "ok", "kind": spec.kind}
    result["top1"] = _mean([c["top1"] for c in corruptions.values()])
    if all("top5" in c for c in corruptions.values()):
        result["top5"] = _mean([c["top5"] for c in corruptions.values()])
    result["count"] = sum(c["count"] for c in corruptions.values())
    result.update(_mce(spec, corruptions))
    if spec.baseline_errors is not None:
        result["corruptions_missing"] = sorted(set(spec.baseline_errors) - set(corruptions))
    result["corruptions"] = corruptions
    return result


def _mce(spec: SuiteSpec, corruptions: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The mCE keys over the comparable corruptions; ``*_partial`` keys when fewer than the benchmark's set."""
    flagged = sorted(name for name, c in corruptions.items() if not c["comparable"])
    if flagged:
        _logger.warning(
            "suite %s: %s lack some of severities %s; not comparable: raw mean error reported, left out of the mCE",
            spec.name,
            flagged,
            "-".join((SEVERITIES[0], SEVERITIES[-1])),
        )
    comparable = [c for c in corruptions.values() if c["comparable"]]
    full = len(spec.baseline_errors if spec.baseline_errors is not None else load_alexnet_errors())
    suffix = "" if len(comparable) >= full else "_partial"
    out: dict[str, Any] = {"mce_corruptions": len(comparable), "mce_corruptions_full": full}
    if comparable:
        out[f"mce_unnormalized{suffix}"] = _mean([c["error"] for c in comparable])
        if spec.baseline_errors is not None:
            out[f"mce{suffix}"] = _mean([c["ce"] for c in comparable])
        if suffix:
            _logger.warning(
                "suite %s: mCE over %d of %d corruptions, reported as *_partial", spec.name, len(comparable), full
            )
    if spec.baseline_clean_error is not None:
        out["baseline_clean_error"] = 100.0 * spec.baseline_clean_error
    out["corruptions_not_comparable"] = flagged
    return out


def _evaluate_suite(scorer: _Scorer, spec: SuiteSpec) -> dict[str, Any]:
    if not spec.path.is_dir():
        return _skipped(spec, f"folder not found: {spec.path}")
    if spec.layout == CORRUPTION_FOLDERS:
        return _evaluate_corruptions(scorer, spec)
    scores = scorer.score(spec.path, spec)
    if scores is None:
        return _skipped(spec, f"no images under {spec.path}")
    return {"status": "ok", "kind": spec.kind, **scores}


def evaluate_suites(
    model: nn.Module,
    suites: Sequence[SuiteSpec],
    *,
    class_list: ClassList,
    image_size: int,
    batch_size: int,
    device: str | torch.device | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on each suite and summarize (see :func:`summarize` for the report's keys).

    Args:
        model: maps ``[0, 1]`` images ``[B, 3, H, W]`` to logits ``[B, len(class_list)]``; it normalizes its own
            input and must already sit on ``device``. It is put in eval mode and restored afterwards.
        suites: what to score, e.g. from :func:`resolve_suites`.
        class_list: the classes the logits index (``classes.txt``).
        image_size: test resolution (resize by ``image_size / crop_pct``, center crop ``image_size``).
        batch_size: images per forward pass (per process).
        device: where images go; None = the model's device.
        crop_pct: center-crop fraction of the test transform.
        interpolation: resize filter of the test transform.
        num_workers: DataLoader worker processes.
        progress: log each scored folder (primary rank only).

    Returns:
        The report: ``{"suites": {name: result}, "clean_top1", "ood_mean_top1", ...}``.

    Raises:
        DADError: a suite folder holds a class the class list (or the suite's subset) does not have, a
            ``suite.json`` is invalid, or the model's logits do not match the class list.
        ValueError: two suites share a name.
    """
    names = [spec.name for spec in suites]
    if len(set(names)) != len(names):
        raise ValueError(f"suite names must be unique, got {names}")
    device = _model_device(model) if device is None else torch.device(device)
    transform = create_eval_transform(image_size, crop_pct=crop_pct, interpolation=interpolation)
    scorer = _Scorer(model, class_list, transform, batch_size, device, num_workers, progress)
    was_training = model.training
    model.eval()
    try:
        results = {spec.name: _evaluate_suite(scorer, spec) for spec in suites}
    finally:
        model.train(was_training)
    report = summarize(results)
    report["settings"] = {
        "num_classes": len(class_list),
        "image_size": image_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "world_size": _world()[1],
    }
    return report


def evaluate_ood(model: nn.Module, cfg: DADConfig, *, device: str | torch.device | None = None) -> dict[str, Any]:
    """:func:`evaluate_suites` as a configuration describes it: the suites ``cfg.eval.suites`` under ``cfg.eval.root``
    (else ``<cfg.data.root>/suites``), the classes of ``<cfg.data.root>/classes.txt``, the test transform of
    ``cfg.eval`` or else of the model's timm ``pretrained_cfg``.

    Args:
        model: as for :func:`evaluate_suites`.
        cfg: the resolved configuration (``data`` and ``eval`` sections are read).
        device: where images go; None = the model's device.

    Returns:
        The report of :func:`evaluate_suites`.

    Raises:
        FileNotFoundError: ``classes.txt`` is missing.
    """
    data_root = Path(cfg.data.root)
    crop_pct, interpolation = resolve_eval_transform(model, cfg.eval.crop_pct, cfg.eval.interpolation)
    suites = resolve_suites(Path(cfg.eval.root or data_root / "suites"), cfg.eval.suites)
    return evaluate_suites(
        model,
        suites,
        class_list=read_classes(data_root / "classes.txt"),
        image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        device=device,
        crop_pct=crop_pct,
        interpolation=interpolation,
        num_workers=cfg.data.num_workers,
    )


def _with_relative(result: Mapping[str, Any], clean_error: float) -> dict[str, Any]:
    """A corruption suite's result plus its relative corruption errors, given the model's clean error (%)."""
    out = dict(result)
    for key in ("mce_unnormalized", "mce_unnormalized_partial"):
        if key in out:
            out[f"relative_{key}"] = out[key] - clean_error
    if "baseline_clean_error" not in out:
        return out
    corruptions = {name: dict(c) for name, c in out["corruptions"].items()}
    for c in corruptions.values():
        if "ce" in c:
            # relative CE_c = sum_s (E_s,c - E_clean) / sum_s (E^AlexNet_s,c - E^AlexNet_clean), x100 (Hendrycks &
            # Dietterich 2019, section 3); over all five severities the sums reduce to the severity means
            c["relative_ce"] = 100.0 * (c["error"] - clean_error) / (c["baseline_error"] - out["baseline_clean_error"])
    out["corruptions"] = corruptions
    relative = [c["relative_ce"] for c in corruptions.values() if "relative_ce" in c]
    if relative:
        out["relative_mce" if "mce" in out else "relative_mce_partial"] = _mean(relative)
    return out


def summarize(suite_results: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The top-level report over per-suite results.

    ``clean_top1`` is the top-1 of the first clean suite that ran (``clean_suite`` names it; None when none ran).
    ``ood_mean_top1`` is the mean top-1 over the non-clean suites that ran (a corruption suite enters with its
    mean top-1 over corruptions; None when none ran); ``ood_suites`` lists them. When a clean suite ran, corruption
    suites gain ``relative_mce_unnormalized = mce_unnormalized - (100 - clean_top1)`` and, with a baseline clean
    error, each comparable corruption its ``relative_ce`` and the suite ``relative_mce`` (``*_partial`` beside a
    partial mCE). The input is not modified.
    """
    ran = {name: r for name, r in suite_results.items() if r.get("status") == "ok"}
    clean = next((name for name, r in ran.items() if r["kind"] == "clean"), None)
    clean_top1 = ran[clean]["top1"] if clean is not None else None
    ood = [name for name, r in ran.items() if r["kind"] != "clean"]
    suites = {name: dict(r) for name, r in suite_results.items()}
    if clean_top1 is not None:
        for name in ood:
            if "corruptions" in suites[name]:
                suites[name] = _with_relative(suites[name], 100.0 - clean_top1)
    return {
        "clean_suite": clean,
        "clean_top1": clean_top1,
        "ood_mean_top1": _mean([ran[name]["top1"] for name in ood]) if ood else None,
        "ood_suites": ood,
        "skipped": sorted(name for name in suite_results if name not in ran),
        "suites": suites,
    }


_MCE_KEYS = ("mce", "relative_mce", "mce_unnormalized", "relative_mce_unnormalized")
_FLAT_KEYS = ("top1", "top5", *_MCE_KEYS, *(f"{key}_partial" for key in _MCE_KEYS), "mce_corruptions")


def flatten_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics for MLflow and KFP ``Metrics``: ``clean_top1``, ``ood_mean_top1`` and ``<suite>/<key>`` for
    top1, top5, the mCE keys (mce, relative_mce, mce_unnormalized, relative_mce_unnormalized, each also as
    ``*_partial``) and mce_corruptions. Absent values are left out, never zero."""
    flat = {key: float(report[key]) for key in ("clean_top1", "ood_mean_top1") if report.get(key) is not None}
    for name, result in report["suites"].items():
        flat.update({f"{name}/{key}": float(result[key]) for key in _FLAT_KEYS if key in result})
    return flat


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """A handful of numbers for ``dvc metrics show``: ``clean_top1``, ``ood_mean_top1`` and ``<suite>_top1`` for
    every suite that ran (a corruption suite's mean over its corruptions). Absent values are left out."""
    flat = {key: float(report[key]) for key in ("clean_top1", "ood_mean_top1") if report.get(key) is not None}
    ran = {name: r for name, r in report["suites"].items() if r.get("status") == "ok" and "top1" in r}
    return flat | {f"{name}_top1": float(r["top1"]) for name, r in ran.items()}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _notes(result: Mapping[str, Any]) -> str:
    if result["status"] != "ok":
        return f"skipped: {result['reason']}"
    if "mce_corruptions" not in result:
        return ""
    n, full = result["mce_corruptions"], result["mce_corruptions_full"]
    partial = "_partial" if n < full else ""
    parts = [f"partial mCE over {n} of {full} corruptions (not comparable with a full mCE)"] if partial else []
    for key, label in (("mce", "mCE (AlexNet-normalized)"), ("relative_mce", "relative mCE")):
        if f"{key}{partial}" in result:
            parts.append(f"{label} {result[key + partial]:.2f}")
    if f"mce_unnormalized{partial}" in result:
        relative = result.get(f"relative_mce_unnormalized{partial}")
        extra = f" (relative {relative:.2f})" if relative is not None else ""
        parts.append(f"mean corruption error {result['mce_unnormalized' + partial]:.2f}{extra}")
    if result["corruptions_not_comparable"]:
        parts.append(f"not comparable, severities missing: {', '.join(result['corruptions_not_comparable'])}")
    return "; ".join(parts)


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "# Evaluation",
        "",
        "| suite | kind | top-1 (%) | top-5 (%) | images | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, r in report["suites"].items():
        count = r.get("count", "—")
        lines.append(
            f"| {name} | {r.get('kind', '')} | {_fmt(r.get('top1'))} | {_fmt(r.get('top5'))} | {count} | {_notes(r)} |"
        )
    clean = f"{_fmt(report['clean_top1'])} ({report['clean_suite']})" if report["clean_suite"] else "—"
    ood = _fmt(report["ood_mean_top1"])
    lines += ["", f"Clean top-1: {clean}. OOD mean top-1: {ood} over {len(report['ood_suites'])} suite(s)."]
    lines.append("mCE: lower is better; accuracies are percentages; skipped suites enter no mean.")
    return "\n".join(lines) + "\n"


def _plot(report: Mapping[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    ran = {n: r for n, r in report["suites"].items() if r["status"] == "ok"}
    fig = Figure(figsize=(max(4.0, 1.1 * len(ran) + 2), 4), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:blue" if r["kind"] == "clean" else "tab:orange" for r in ran.values()]
    bars = ax.bar(list(ran), [r["top1"] for r in ran.values()], color=colors)
    ax.bar_label(bars, fmt="%.1f")
    if report["ood_mean_top1"] is not None:
        ax.axhline(report["ood_mean_top1"], color="tab:red", linestyle="--", label="OOD mean")
        ax.legend(loc="upper right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(
        "Top-1 by suite" + (f" (skipped: {', '.join(report['skipped'])})" if report["skipped"] else ""), fontsize=9
    )
    ax.tick_params(axis="x", labelrotation=30)
    return atomic_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def save_report(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write ``eval_report.json``, ``eval_report.md`` (a table for the pipeline UI) and ``accuracy.png`` (top-1
    per suite), each atomically.

    Args:
        results: the report from :func:`evaluate_suites`.
        output_dir: created if missing.

    Returns:
        ``{"json": ..., "markdown": ..., "plot": ...}`` paths.
    """
    output_dir = Path(output_dir)
    return {
        "json": atomic_write_json(output_dir / REPORT_JSON, results),
        "markdown": atomic_write_text(output_dir / REPORT_MD, _markdown(results)),
        "plot": _plot(results, output_dir / REPORT_PNG),
    }
