"""Run the teacher once: DAD samples, explicit labels and the teacher's soft labels, in resumable shards.

Layout of a cache directory::

    deps.json              what the cache depends on (teacher, VQGAN, attack, dataset, views, version)
    shard-00000.pt         one torch file per ``shard_size`` images (uint8 images, explicit labels, top-k probs)
    shard-00000.json       its sidecar: sample range, count, sha256 of the .pt (a shard is done when this exists)
    manifest.json          deps + every shard's checksum and diagnostics; written once all shards are present
    samples.png            clean | VQ(x) | DAD | difference grid with the teacher's predictions, for a person to look at

Survival diagnostics (:func:`dad_core.attack.measure_survival`: the teacher's top-1 on x, VQ(x), the attacked image
before discretization and the DAD sample; the fraction of codes the attack changed; the pixel change versus
VQ(VQ(x))) run on the first :data:`DIAGNOSTIC_IMAGES` images of each shard, not on every image: they cost about one
more VQ round trip per diagnosed image. Each sidecar holds its shard's, the manifest their image-weighted mean.

Shards are assigned round-robin (``shard k`` goes to worker ``k % num_shards``), written atomically, and
skipped on a rerun when their sidecar and checksum agree, so a killed worker loses at most the shard in flight.
Soft labels are the teacher's probabilities at the loss temperature T, stored as top-k (fp16) with the rest of
the mass spread evenly over the other classes on load (exact when k = number of classes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dad_core._version import __version__
from dad_core.attack import Discretizer, generate_dad_samples, measure_survival, trace_dad_samples
from dad_core.config import AttackConfig, DADConfig, config_to_dict
from dad_core.data import ImageFolderDataset, create_eval_transform, open_split
from dad_core.errors import DADError
from dad_core.io import atomic_path, atomic_write_json, save_torch, sha256_file
from dad_core.losses import soften
from dad_core.progress import progress_bar
from dad_core.serialization import WeightsFileError, load_torch_file
from dad_core.views import apply_view, apply_views, sample_views

__all__ = [
    "DIAGNOSTIC_IMAGES",
    "VERIFY_MODES",
    "CacheMismatchError",
    "TeacherCache",
    "aggregate_diagnostics",
    "cache_dependencies",
    "cache_teacher",
    "dataset_hash",
    "expand_topk",
    "finalize_cache",
    "load_teacher_cache",
]

_logger = logging.getLogger(__name__)
CACHE_FORMAT = "dad-teacher-cache/1"
DIAGNOSTIC_IMAGES = 32  # survival diagnostics on the first images of each shard (about one more VQ round trip each)
_PREVIEW_IMAGES = 8  # of those, kept in the shard (VQ(x), VQ(VQ(x)), predictions) for samples.png
_STAGES = ("clean", "vq", "attacked", "dad")  # the columns of a shard's ``preview_pred``
VERIFY_MODES = ("lazy", "full", "none")  # when load_teacher_cache / TeacherCache check the shards' sha256
_VERIFIED_DIR = Path(tempfile.gettempdir()) / "dad-verified-shards"  # lazy verification's markers, one per file


class CacheMismatchError(DADError):
    """The cache on disk was made from other inputs than the ones configured, or is incomplete."""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def dataset_hash(data_root: str | Path) -> str:
    """The ``dataset_hash`` that prepare-data recorded in the dataset's manifest."""
    manifest = _read_json(Path(data_root) / "manifest.json")
    if not manifest or "dataset_hash" not in manifest:
        raise CacheMismatchError(f"{data_root}: no manifest.json with a dataset_hash; run `dad prepare-data` first")
    return manifest["dataset_hash"]


def cache_dependencies(
    cfg: DADConfig, *, dataset: str, teacher_checkpoint_sha256: str | None, vqgan_checkpoint_sha256: str | None
) -> dict[str, Any]:
    """Everything the cache's contents depend on; a training run compares it before using the cache."""
    return {
        "format": CACHE_FORMAT,
        "teacher": {
            "model_name": cfg.teacher.model_name,
            "pretrained": cfg.teacher.pretrained,
            "templates": cfg.teacher.templates,
            "checkpoint_sha256": teacher_checkpoint_sha256,
        },
        "vqgan": {
            "config": cfg.vqgan.config,
            "checkpoint_sha256": vqgan_checkpoint_sha256,
            "precision": cfg.vqgan.precision,  # bf16 modes move DAD pixels (and, for bf16, near-tie codes) on GPUs
        },
        "attack": config_to_dict(cfg.attack),
        "dataset_hash": dataset,
        "transform": {"kind": "resize+center-crop", "image_size": cfg.data.image_size},
        "views": {
            "views": cfg.cache.views,
            "topk": cfg.cache.topk,
            "seed": cfg.cache.seed,
            "crop_scale": list(cfg.train.crop_scale),
            "hflip": cfg.train.hflip,
            "randaugment": cfg.train.randaugment,
            # which implementation drew the views' RandAugment (the backends pick other ops for one seed)
            "randaugment_backend": cfg.train.randaugment_backend if cfg.train.randaugment else None,
            "temperature": cfg.loss.temperature,
        },
        "shard_size": cfg.cache.shard_size,
        "batch_size": cfg.cache.batch_size,  # the random-start coin is drawn once per batch: it shapes the bytes
        "package_version": __version__,
    }


def _topk(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = min(k, probs.shape[-1])
    values, indices = probs.float().topk(k, dim=-1)
    index_dtype = torch.int16 if probs.shape[-1] < 2**15 else torch.int32
    return values.half().cpu(), indices.to(index_dtype).cpu()


def expand_topk(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """Rebuild ``[..., K]`` probabilities from top-k: the remaining mass is spread over the other classes."""
    values = values.float()
    k = values.shape[-1]
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    probs = (
        rest.expand(*values.shape[:-1], num_classes).clone()
        if k < num_classes
        else values.new_zeros(*values.shape[:-1], num_classes)
    )
    probs.scatter_(-1, indices.long(), values)
    return probs / probs.sum(-1, keepdim=True)


def _teacher_probs(teacher: nn.Module, images: Tensor, temperature: float, autocast: bool) -> Tensor:
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        return soften(teacher(images), temperature)


def _to_uint8(images: Tensor) -> Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _make_shard(
    teacher: nn.Module,
    vqgan: Discretizer,
    dataset: ImageFolderDataset,
    indices: list[int],
    cfg: DADConfig,
    shard_id: int,
    device: torch.device,
) -> tuple[dict[str, Tensor], dict[str, float | None]]:
    """Compute one shard in memory: clean + DAD images, labels, soft labels, and R views of each; and the survival
    diagnostics of its first images."""
    from torch.utils.data import DataLoader, Subset

    gen = torch.Generator(device=device).manual_seed(cfg.cache.seed * 100_003 + shard_id)
    rng = np.random.default_rng([cfg.cache.seed, shard_id])
    on_gpu = device.type == "cuda"
    T, k = cfg.loss.temperature, cfg.cache.topk
    loader = DataLoader(
        Subset(dataset, indices), batch_size=cfg.cache.batch_size, num_workers=cfg.data.num_workers, pin_memory=on_gpu
    )
    out: dict[str, list[Tensor]] = {key: [] for key in ("clean", "dad", "labels")}
    diagnostics, preview = None, {}
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if on_gpu:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            if diagnostics is None:  # the shard's first batch
                dad, diagnostics, preview = _diagnosed_batch(teacher, vqgan, images, labels, cfg.attack, gen)
            else:
                dad = generate_dad_samples(teacher, vqgan, images, labels, cfg.attack, generator=gen)
        out["clean"].append(_to_uint8(images))
        out["dad"].append(_to_uint8(dad))
        out["labels"].append(labels.cpu())
    shard = {key: torch.cat(value) for key, value in out.items()}
    shard["indices"] = torch.tensor(indices, dtype=torch.int64)
    shard.update(preview)
    # Soft labels on exactly the stored (uint8) pixels, so replay at training time sees the same input.
    for name in ("clean", "dad"):
        probs = _batched_probs(teacher, shard[name], cfg.cache.batch_size, device, T, on_gpu)
        shard[f"{name}_topv"], shard[f"{name}_topi"] = _topk(probs, k)
    if cfg.cache.views:
        n, _, h, w = shard["clean"].shape
        shard["views"] = sample_views(n, cfg.cache.views, h, w, rng, scale=cfg.train.crop_scale, hflip=cfg.train.hflip)
        for name in ("clean", "dad"):
            probs = _view_probs(teacher, shard[name], shard["views"], cfg, device, on_gpu)
            values, idx = _topk(probs, k)
            shard[f"view_{name}_topv"] = values.view(n, cfg.cache.views, -1)
            shard[f"view_{name}_topi"] = idx.view(n, cfg.cache.views, -1)
    return shard, diagnostics


def _diagnosed_batch(
    teacher: nn.Module,
    vqgan: Discretizer,
    images: Tensor,
    labels: Tensor,
    attack: AttackConfig,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, float | None], dict[str, Tensor]]:
    """A batch's DAD samples (the same as :func:`generate_dad_samples`), the survival diagnostics of its first
    :data:`DIAGNOSTIC_IMAGES` images, and the preview of its first few for ``samples.png``."""
    trace = trace_dad_samples(teacher, vqgan, images, labels, attack, generator=generator)
    n = min(DIAGNOSTIC_IMAGES, len(labels))
    survival = measure_survival(teacher, vqgan, images[:n], labels[:n], trace.first(n))
    p = min(_PREVIEW_IMAGES, n)
    preview = {
        "preview_vq": _to_uint8(trace.vq[:p]),
        "preview_reference": _to_uint8(survival.reference[:p]),  # VQ(VQ(x))
        "preview_pred": torch.stack([survival.predictions[stage][:p] for stage in _STAGES], dim=1).int().cpu(),
    }
    return trace.dad, survival.metrics, preview


def aggregate_diagnostics(per_shard: list[dict[str, float | None] | None]) -> dict[str, float | None]:
    """Image-count-weighted mean of each survival metric over shards; a shard without a value (None: no code indices,
    or a shard made before diagnostics existed) does not count for that metric.

    Args:
        per_shard: each shard's diagnostics (``images`` and the metrics of :func:`dad_core.attack.measure_survival`).

    Returns:
        ``images`` (their total) and each metric's weighted mean; ``{}`` when no shard has diagnostics.
    """
    shards = [d for d in per_shard if d]
    keys = [key for key in dict.fromkeys(k for d in shards for k in d) if key != "images"]
    out: dict[str, float | None] = {"images": sum(d["images"] for d in shards)} if shards else {}
    for key in keys:
        pairs = [(d["images"], d[key]) for d in shards if d.get(key) is not None]
        weight = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / weight if weight else None
    return out


def _view_probs(
    teacher: nn.Module, images: Tensor, views: Tensor, cfg: DADConfig, device: torch.device, autocast: bool
) -> Tensor:
    """Teacher probabilities on every stored view, ``[N * R, K]``, built batch by batch on the device.

    The views are made as training replays them: batched by :func:`apply_views` (on a CPU bit-identical to
    :func:`apply_view`), or one by one for timm's PIL RandAugment.
    """
    pairs = [(i, r) for i in range(views.shape[0]) for r in range(views.shape[1])]
    images = images.to(device)
    t, size = cfg.train, cfg.data.image_size
    chunks = []
    for start in range(0, len(pairs), cfg.cache.batch_size):
        chunk = pairs[start : start + cfg.cache.batch_size]
        if t.randaugment and t.randaugment_backend == "pil":
            batch = torch.stack([apply_view(images[i], views[i, r], size, randaugment=t.randaugment) for i, r in chunk])
        else:
            rows, cols = torch.tensor([i for i, _ in chunk]), torch.tensor([r for _, r in chunk])
            batch = apply_views([images[rows.to(device)]], views[rows, cols], size, randaugment=t.randaugment)[0]
        chunks.append(_teacher_probs(teacher, batch, cfg.loss.temperature, autocast).float().cpu())
    return torch.cat(chunks)


def _batched_probs(teacher, images: Tensor, batch_size: int, device, T: float, autocast: bool) -> Tensor:
    """Teacher probabilities on uint8 images ``[N, 3, H, W]``, batch by batch."""
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float() / 255.0
        chunks.append(_teacher_probs(teacher, x, T, autocast).float().cpu())
    return torch.cat(chunks)


def _shard_paths(root: Path, shard_id: int) -> tuple[Path, Path]:
    return root / f"shard-{shard_id:05d}.pt", root / f"shard-{shard_id:05d}.json"


def _shard_is_valid(root: Path, shard_id: int) -> bool:
    data, sidecar = _shard_paths(root, shard_id)
    info = _read_json(sidecar)
    return bool(info) and data.is_file() and sha256_file(data) == info.get("sha256")


def _compiled(teacher: nn.Module, vqgan: Discretizer) -> tuple[nn.Module, Discretizer]:
    """``torch.compile`` the teacher (forward and the attack's backward) and the VQGAN's encoder and decoder."""
    teacher = torch.compile(teacher)
    for name in ("encoder", "decoder"):
        if isinstance(getattr(vqgan, name, None), nn.Module):
            setattr(vqgan, name, torch.compile(getattr(vqgan, name)))
    return teacher, vqgan


def _write_shard(
    root: Path, shard_id: int, start: int, shard: dict[str, Tensor], diagnostics: dict[str, float | None]
) -> None:
    """Save a shard atomically, then its sidecar: a shard counts as done only once the sidecar exists."""
    data_path, sidecar = _shard_paths(root, shard_id)
    save_torch(shard, data_path)
    info = {
        "shard": shard_id,
        "start": start,
        "count": len(shard["labels"]),
        "sha256": sha256_file(data_path),
        "bytes": data_path.stat().st_size,  # lets a training run catch a truncated shard with a stat at start-up
    }
    atomic_write_json(sidecar, {**info, "diagnostics": diagnostics})


def _check_deps(root: Path, deps: dict[str, Any]) -> None:
    existing = _read_json(root / "deps.json")
    if existing is None:
        atomic_write_json(root / "deps.json", deps)
    elif _with_later_fields(existing) != deps:  # a cache half-written by an older version resumes
        diff = sorted(key for key in set(existing) | set(deps) if existing.get(key) != deps.get(key))
        raise CacheMismatchError(
            f"{root} already holds a cache made from other inputs (differs in: {', '.join(diff)}); "
            "use another output folder or delete it"
        )


def cache_teacher(
    cfg: DADConfig,
    data_root: str | Path,
    output_dir: str | Path,
    teacher: nn.Module,
    vqgan: Discretizer,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    device: str | torch.device = "cpu",
    teacher_checkpoint_sha256: str | None = None,
    vqgan_checkpoint_sha256: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write this worker's shards of the teacher cache (resuming), then the manifest if all shards exist.

    Args:
        cfg: the resolved configuration (teacher, vqgan, attack, cache, train views, loss temperature).
        data_root: a prepared dataset (``dad prepare-data``); its ``train`` split is cached.
        output_dir: the cache directory, shared by all workers.
        teacher: the frozen teacher (images in [0, 1] -> logits).
        vqgan: the discretizer (``reconstruct``).
        shard_index: this worker's index in ``[0, num_shards)``.
        num_shards: how many workers split the shards.
        device: where the teacher and VQGAN run.
        teacher_checkpoint_sha256: recorded in the manifest as lineage.
        vqgan_checkpoint_sha256: recorded in the manifest as lineage.
        progress: show a progress bar.

    Returns:
        A JSON-able report: shards written / skipped, images, images/s, paths, manifest state, and the survival
        diagnostics: ``shard_diagnostics`` (this worker's shards), ``diagnostics`` (their image-weighted mean) and
        ``cache_diagnostics`` (the whole cache's, once the manifest exists).

    Raises:
        CacheMismatchError: ``output_dir`` holds a cache made from other inputs.
    """
    if not 0 <= shard_index < num_shards:
        raise CacheMismatchError(f"shard index {shard_index} is not in [0, {num_shards})")
    root, device = Path(output_dir), torch.device(device)
    root.mkdir(parents=True, exist_ok=True)
    deps = cache_dependencies(
        cfg,
        dataset=dataset_hash(data_root),
        teacher_checkpoint_sha256=teacher_checkpoint_sha256,
        vqgan_checkpoint_sha256=vqgan_checkpoint_sha256,
    )
    _check_deps(root, deps)
    dataset = open_split(data_root, "train", create_eval_transform(cfg.data.image_size))
    if cfg.cache.compile:
        teacher, vqgan = _compiled(teacher, vqgan)
    total_shards = (len(dataset) + cfg.cache.shard_size - 1) // cfg.cache.shard_size
    mine = list(range(shard_index, total_shards, num_shards))
    written, skipped, images, start = [], [], 0, time.perf_counter()
    # One writer thread: shard k is saved and hashed while shard k+1 is computed; at most one write is pending,
    # so memory holds at most two shards.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for shard_id in progress_bar(mine, desc=f"cache shards (worker {shard_index}/{num_shards})", enabled=progress):
            if _shard_is_valid(root, shard_id):
                skipped.append(shard_id)
                continue
            lo = shard_id * cfg.cache.shard_size
            indices = list(range(lo, min(lo + cfg.cache.shard_size, len(dataset))))
            shard, diagnostics = _make_shard(teacher, vqgan, dataset, indices, cfg, shard_id, device)
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_shard, root, shard_id, lo, shard, diagnostics)
            written.append(shard_id)
            images += len(indices)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - start
    manifest = finalize_cache(root, total_shards=total_shards, num_samples=len(dataset))
    diagnostics = {i: (_read_json(_shard_paths(root, i)[1]) or {}).get("diagnostics") for i in mine}
    _logger.info(
        "cache worker %d/%d: %d shards written, %d skipped, %.1f images/s",
        shard_index,
        num_shards,
        len(written),
        len(skipped),
        images / max(seconds, 1e-9),
    )
    return {
        "output_dir": str(root),
        "shard_index": shard_index,
        "num_shards": num_shards,
        "total_shards": total_shards,
        "shards_written": written,
        "shards_skipped": skipped,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / max(seconds, 1e-9), 2),
        "complete": manifest is not None,
        "manifest_sha256": sha256_file(root / "manifest.json") if manifest else None,
        "diagnostics": aggregate_diagnostics(list(diagnostics.values())),
        "shard_diagnostics": [{"shard": i, **d} for i, d in diagnostics.items() if d],
        "cache_diagnostics": manifest["diagnostics"] if manifest else None,
    }


def finalize_cache(root: str | Path, *, total_shards: int, num_samples: int) -> dict | None:
    """Write ``manifest.json`` (and ``samples.png``) once every shard is present; None while some are missing."""
    root = Path(root)
    sidecars = [_read_json(_shard_paths(root, i)[1]) for i in range(total_shards)]
    if any(s is None for s in sidecars):
        return None
    manifest = {
        **json.loads((root / "deps.json").read_text()),
        "num_samples": num_samples,
        "num_shards": total_shards,
        "shards": {f"shard-{s['shard']:05d}": s for s in sidecars},
        "diagnostics_sample": f"the first {DIAGNOSTIC_IMAGES} images of each shard",
        "diagnostics": aggregate_diagnostics([s.get("diagnostics") for s in sidecars]),
    }
    atomic_write_json(root / "manifest.json", manifest)
    _write_sample_grid(root, total_shards)
    return manifest


def _preview_rows(root: Path, total_shards: int, n: int) -> list[tuple[list[Tensor], list[str]]]:
    """Up to ``n`` previewed samples spread over the cache (shards follow class order, so the first shard alone would
    show one class), taken round-robin over the shards: four uint8 ``[3, H, W]`` tiles (clean, VQ(x), DAD, amplified
    difference) and their captions each."""
    picks = []
    shard_ids = sorted({round(i * (total_shards - 1) / max(n - 1, 1)) for i in range(n)})
    for shard_id in shard_ids:
        shard = load_torch_file(_shard_paths(root, shard_id)[0], mmap=True)
        picks += [(j, shard_id, shard) for j in range(len(shard.get("preview_pred", [])))]
    rows = []
    for j, _, shard in sorted(picks, key=lambda pick: pick[:2])[:n]:
        clean, vq, attacked, dad = shard["preview_pred"][j].tolist()  # the teacher's top-1 on each of _STAGES
        diff = (shard["dad"][j].float() - shard["preview_reference"][j].float()).abs().amax(dim=0)
        peak = float(diff.max())
        stretched = (diff * (255 / max(peak, 1e-9))).round().to(torch.uint8).expand(3, -1, -1)
        tiles = [shard["clean"][j], shard["preview_vq"][j], shard["dad"][j], stretched]
        label = int(shard["labels"][j])
        rows.append(
            (tiles, [f"y={label} pred {clean}", f"pred {vq}", f"pred {dad} (pre {attacked})", f"max {peak:.0f}/255"])
        )
    return rows


def _write_sample_grid(root: Path, total_shards: int, n: int = 8, panels: int = 2) -> None:
    """``samples.png``: ``n`` samples spread over the cache, one row each, in ``panels`` side-by-side panels whose
    columns are clean | VQ(x) | DAD sample | ``|DAD - VQ(VQ(x))|`` (channel maximum, stretched to its own maximum so
    a difference of one gray level shows). Under each image the teacher's top-1: on the clean image with the label,
    on the DAD sample with its prediction before discretization in brackets, and the difference's maximum in /255.
    Images are upscaled (nearest) to about 128 px so 32-px digits can be read."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _preview_rows(root, total_shards, n)
    if not rows:
        return
    height, width = rows[0][0][0].shape[-2:]
    scale = max(1, round(128 / height))
    tile_w, tile_h, pad, text_h = width * scale, height * scale, 4, 16
    per_panel = -(-len(rows) // panels)
    panels = -(-len(rows) // per_panel)
    col_w, row_h = tile_w + pad, tile_h + text_h + pad
    canvas = Image.new(
        "RGB", (pad + panels * 4 * col_w + (panels - 1) * 3 * pad, pad + text_h + per_panel * row_h), "white"
    )
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    for i, (tiles, captions) in enumerate(rows):
        panel, row = divmod(i, per_panel)
        x0, y = pad + panel * (4 * col_w + 3 * pad), pad + text_h + row * row_h
        for c, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
            image = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(image, (x0 + c * col_w, y))
            draw.text((x0 + c * col_w, y + tile_h + 1), caption, fill="black", font=font)
            if row == 0:
                header = ("clean", "VQ(x)", "DAD sample", "|DAD - VQ(VQ(x))|")[c]
                draw.text((x0 + c * col_w, pad), header, fill="black", font=font)
    atomic_path(root / "samples.png", lambda tmp: canvas.save(tmp, "PNG"))


@dataclass
class TeacherCache:
    """Read access to a finished cache; shards are memory-mapped and loaded on first use.

    With ``verify="lazy"`` a shard's file is hashed when it is first opened and compared with the manifest's
    sha256, once per machine (loader workers share a marker, see :func:`_verify_once`); a mismatch raises
    :class:`CacheMismatchError` naming the file, which stops training.
    """

    root: Path
    manifest: dict[str, Any]
    num_classes: int
    verify: str = "none"  # one of VERIFY_MODES, set by load_teacher_cache; only "lazy" hashes here

    def __post_init__(self) -> None:
        self._shards: dict[int, dict[str, Tensor]] = {}
        self.shard_size = self.manifest["shard_size"]

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    @property
    def views(self) -> int:
        return self.manifest["views"]["views"]

    def shard(self, shard_id: int) -> dict[str, Tensor]:
        if shard_id not in self._shards:
            path = _shard_paths(self.root, shard_id)[0]
            if self.verify == "lazy":
                _verify_once(path, self.manifest["shards"][path.stem])
            try:  # the product's safe loader: a pickled shard is refused in one line, nothing in it runs
                self._shards[shard_id] = load_torch_file(path, mmap=True)
            except WeightsFileError as err:
                raise CacheMismatchError(f"teacher cache shard {err}") from None
        return self._shards[shard_id]

    def item(self, index: int) -> tuple[dict[str, Tensor], int]:
        """The shard holding sample ``index`` and the sample's offset in it."""
        shard_id, offset = divmod(index, self.shard_size)
        return self.shard(shard_id), offset

    def labels(self) -> Tensor:
        return torch.cat([self.shard(i)["labels"] for i in range(self.manifest["num_shards"])])

    def probs(self, shard: dict[str, Tensor], offset: int, name: str, view: int | None = None) -> Tensor:
        """Teacher probabilities at temperature T for ``name`` in {clean, dad}, for a view or the full image."""
        prefix = f"view_{name}" if view is not None else name
        values, indices = shard[f"{prefix}_topv"][offset], shard[f"{prefix}_topi"][offset]
        if view is not None:
            values, indices = values[view], indices[view]
        return expand_topk(values, indices, self.num_classes)


# The config key behind each manifest field outside teacher/vqgan/attack (whose keys are <section>.<field>), so
# that a mismatch names the key to pass. Checksums and hashes have none: only a rebuild (or the right file) fixes them.
_CONFIG_KEYS = {
    ("views", "views"): "cache.views",
    ("views", "topk"): "cache.topk",
    ("views", "seed"): "cache.seed",
    ("views", "crop_scale"): "train.crop_scale",
    ("views", "hflip"): "train.hflip",
    ("views", "randaugment"): "train.randaugment",
    ("views", "randaugment_backend"): "train.randaugment_backend",
    ("views", "temperature"): "loss.temperature",
    ("transform", "image_size"): "data.image_size",
}


def _with_later_fields(deps: dict[str, Any]) -> dict[str, Any]:
    """``deps`` with the fields added after caches were first written, set as every cache written before had them:
    ``views.randaugment_backend`` is ``pil`` for a cache with RandAugment and None for one without."""
    views = deps.get("views")
    if not isinstance(views, dict) or "randaugment_backend" in views:
        return deps
    return {**deps, "views": {**views, "randaugment_backend": "pil" if views.get("randaugment") else None}}


def _config_key(section: str, field: str) -> str | None:
    if section in ("teacher", "vqgan", "attack") and not field.endswith("sha256"):
        return f"{section}.{field}"
    return _CONFIG_KEYS.get((section, field))


def _override(value: Any) -> str:
    """``value`` as the right-hand side of ``-p key=value`` (a YAML scalar or flow list)."""
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, separators=(",", ":"))


def _mismatch_message(root: Path, section: str, diff: list[str], have: Any, want: Any) -> str:
    """Name what differs; for a config setting (e.g. ``cache.seed``) give both values and the two ways out."""
    if not (isinstance(have, dict) and isinstance(want, dict)):
        return (
            f"teacher cache {root} does not match the training config: {section} differs in {diff} "
            f"(cache: {have}, config: {want}); rebuild the cache"
        )
    names = {k: _config_key(section, k) for k in diff}
    settable = all(names.values())
    shown = {names[k] if settable else k: (have.get(k), want.get(k)) for k in diff}
    values = "; ".join(f"{name}: {h!r} in the cache, {w!r} in the config" for name, (h, w) in shown.items())
    message = f"teacher cache {root} does not match the training config: {section} differs in {diff} ({values})"
    if not settable:
        return f"{message}; rebuild the cache"
    to_cache = " ".join(f"-p {name}={_override(h)}" for name, (h, _) in shown.items())
    to_config = " ".join(f"-p {name}={_override(w)}" for name, (_, w) in shown.items())
    return f"{message}; pass {to_cache} to train on this cache, or rebuild the cache (dad cache-teacher {to_config})"


def _check_shard_files(root: Path, shards: dict[str, dict[str, Any]]) -> None:
    """Every shard file exists and has the size its sidecar recorded: one ``stat`` per shard, no read."""
    for name, info in shards.items():
        path = root / f"{name}.pt"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheMismatchError(f"{path}: missing; rerun cache-teacher") from None
        want = info.get("bytes")  # caches written before sizes were recorded have none: existence only
        if want is not None and size != want:
            raise CacheMismatchError(
                f"{path}: {size} bytes, its sidecar says {want}; delete it and rerun cache-teacher"
            )


def _verify_checksum(path: Path, info: dict[str, Any]) -> None:
    if sha256_file(path) != info["sha256"]:
        raise CacheMismatchError(f"{path}: checksum mismatch; delete it and rerun cache-teacher")


def _verify_once(path: Path, info: dict[str, Any]) -> None:
    """Lazy verification: hash ``path`` unless a process on this machine has already verified this very file.

    DataLoader workers are new processes every epoch and each one opens most shards, so a check per process alone
    would read the whole cache once per worker per epoch. A verified file leaves an empty marker in the machine's
    temp folder (:data:`_VERIFIED_DIR`) named after its path, size, modification time and expected sha256; a file
    changed since gets no marker and is hashed again. Markers guard against corruption, not against tampering.
    """
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{info['sha256']}"
    marker = _VERIFIED_DIR / hashlib.sha256(key.encode()).hexdigest()
    if marker.exists():
        return
    _verify_checksum(path, info)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only temp folder: every process verifies for itself
        pass


def load_teacher_cache(
    root: str | Path, *, num_classes: int, expected: dict[str, Any] | None = None, verify: str = "lazy"
) -> TeacherCache:
    """Open a finished cache, refusing one whose dependencies differ from ``expected``.

    Only the keys present in ``expected`` are compared, and inside ``teacher``/``vqgan`` a checksum of None means
    "not known here" and is not compared. Every mode checks up front that each shard file exists with its recorded
    size (a ``stat`` per shard).

    Args:
        root: the cache directory.
        num_classes: the classes the soft labels expand to.
        expected: dependencies to compare with the manifest's.
        verify: ``lazy`` (default): each shard's sha256 is checked when it is first opened (once per machine),
            so start-up reads no shard (ImageNet: 386 GB); ``full``: every shard is hashed here, before returning;
            ``none``: no checksums.

    Returns:
        The opened cache.

    Raises:
        CacheMismatchError: the cache is incomplete, a shard is missing, has the wrong size or (``full``) the wrong
            checksum, or it was made from other inputs.
        ValueError: ``verify`` is not one of :data:`VERIFY_MODES`.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    root = Path(root)
    manifest = _read_json(root / "manifest.json")
    if manifest is None:
        raise CacheMismatchError(f"{root}: no manifest.json; the cache is missing or incomplete (run cache-teacher)")
    known = _with_later_fields(manifest)
    for key, want in (expected or {}).items():
        have = known.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            diff = [k for k, v in want.items() if v is not None and have.get(k) != v]
            if key == "views" and {"randaugment", "randaugment_backend"} <= set(diff):
                diff.remove("randaugment_backend")  # the backend of no RandAugment is no setting to pass
        else:
            diff = [] if have == want else [key]
        if diff:
            raise CacheMismatchError(_mismatch_message(root, key, diff, have, want))
    _check_shard_files(root, manifest["shards"])
    if verify == "full":
        for name, info in manifest["shards"].items():
            _verify_checksum(root / f"{name}.pt", info)
    return TeacherCache(root, manifest, num_classes, verify=verify)
