"""Run the teacher once: DAD samples, explicit labels and the teacher's soft labels, in resumable shards.

Layout of a cache directory::

    deps.json              what the cache depends on (teacher, VQGAN, attack, dataset, views, version)
    shard-00000.pt         one torch file per ``shard_size`` images (uint8 images, explicit labels, top-k probs)
    shard-00000.json       its sidecar: sample range, count, sha256 of the .pt (a shard is done when this exists)
    manifest.json          deps + every shard's checksum; written once all shards are present
    samples.png            clean vs DAD grid, for a person to look at

Shards are assigned round-robin (``shard k`` goes to worker ``k % num_shards``), written atomically, and
skipped on a rerun when their sidecar and checksum agree, so a killed worker loses at most the shard in flight.
Soft labels are the teacher's probabilities at the loss temperature T, stored as top-k (fp16) with the rest of
the mass spread evenly over the other classes on load (exact when k = number of classes).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dad_core._version import __version__
from dad_core.attack import Discretizer, generate_dad_samples
from dad_core.config import DADConfig, config_to_dict
from dad_core.data import ImageFolderDataset, create_eval_transform, open_split
from dad_core.errors import DADError
from dad_core.io import atomic_path, atomic_write_json, save_torch, sha256_file
from dad_core.losses import soften
from dad_core.views import apply_view, sample_views

__all__ = [
    "CacheMismatchError",
    "TeacherCache",
    "cache_dependencies",
    "cache_teacher",
    "dataset_hash",
    "expand_topk",
    "finalize_cache",
    "load_teacher_cache",
]

_logger = logging.getLogger(__name__)
CACHE_FORMAT = "dad-teacher-cache/1"


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
) -> dict[str, Tensor]:
    """Compute one shard in memory: clean + DAD images, labels, soft labels, and R views of each."""
    from torch.utils.data import DataLoader, Subset

    gen = torch.Generator(device=device).manual_seed(cfg.cache.seed * 100_003 + shard_id)
    rng = np.random.default_rng([cfg.cache.seed, shard_id])
    on_gpu = device.type == "cuda"
    T, k = cfg.loss.temperature, cfg.cache.topk
    loader = DataLoader(
        Subset(dataset, indices), batch_size=cfg.cache.batch_size, num_workers=cfg.data.num_workers, pin_memory=on_gpu
    )
    out: dict[str, list[Tensor]] = {key: [] for key in ("clean", "dad", "labels")}
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if on_gpu:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            dad = generate_dad_samples(teacher, vqgan, images, labels, cfg.attack, generator=gen)
        out["clean"].append(_to_uint8(images))
        out["dad"].append(_to_uint8(dad))
        out["labels"].append(labels.cpu())
    shard = {key: torch.cat(value) for key, value in out.items()}
    shard["indices"] = torch.tensor(indices, dtype=torch.int64)
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
    return shard


def _view_probs(
    teacher: nn.Module, images: Tensor, views: Tensor, cfg: DADConfig, device: torch.device, autocast: bool
) -> Tensor:
    """Teacher probabilities on every stored view, ``[N * R, K]``, built batch by batch on the device."""
    pairs = [(i, r) for i in range(views.shape[0]) for r in range(views.shape[1])]
    images = images.to(device)
    chunks = []
    for start in range(0, len(pairs), cfg.cache.batch_size):
        batch = torch.stack(
            [
                apply_view(images[i], views[i, r], cfg.data.image_size, randaugment=cfg.train.randaugment)
                for i, r in pairs[start : start + cfg.cache.batch_size]
            ]
        )
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


def _write_shard(root: Path, shard_id: int, start: int, shard: dict[str, Tensor]) -> None:
    """Save a shard atomically, then its sidecar: a shard counts as done only once the sidecar exists."""
    data_path, sidecar = _shard_paths(root, shard_id)
    save_torch(shard, data_path)
    atomic_write_json(
        sidecar, {"shard": shard_id, "start": start, "count": len(shard["labels"]), "sha256": sha256_file(data_path)}
    )


def _check_deps(root: Path, deps: dict[str, Any]) -> None:
    existing = _read_json(root / "deps.json")
    if existing is None:
        atomic_write_json(root / "deps.json", deps)
    elif existing != deps:
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
        A JSON-able report: shards written / skipped, images, images/s, paths, manifest state.

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
        for shard_id in tqdm(mine, desc=f"cache shards (worker {shard_index}/{num_shards})", disable=not progress):
            if _shard_is_valid(root, shard_id):
                skipped.append(shard_id)
                continue
            lo = shard_id * cfg.cache.shard_size
            indices = list(range(lo, min(lo + cfg.cache.shard_size, len(dataset))))
            shard = _make_shard(teacher, vqgan, dataset, indices, cfg, shard_id, device)
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_shard, root, shard_id, lo, shard)
            written.append(shard_id)
            images += len(indices)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - start
    manifest = finalize_cache(root, total_shards=total_shards, num_samples=len(dataset))
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
    }
    atomic_write_json(root / "manifest.json", manifest)
    _write_sample_grid(root, total_shards)
    return manifest


def _write_sample_grid(root: Path, total_shards: int, n: int = 16) -> None:
    """Clean images (top row) over their DAD samples (bottom row), spread over the whole cache (shards follow
    class order, so the first shard alone would show one class)."""
    from PIL import Image
    from torchvision.utils import make_grid

    clean, dad = [], []
    for shard_id in sorted({round(i * (total_shards - 1) / max(n - 1, 1)) for i in range(n)}):
        shard = torch.load(_shard_paths(root, shard_id)[0], map_location="cpu", weights_only=True, mmap=True)
        per_shard = max(1, n // total_shards)
        picks = torch.linspace(0, len(shard["labels"]) - 1, per_shard).long()
        clean.append(shard["clean"][picks])
        dad.append(shard["dad"][picks])
    clean, dad = torch.cat(clean)[:n], torch.cat(dad)[:n]
    grid = make_grid(torch.cat([clean, dad]), nrow=len(clean), padding=2, pad_value=128)
    atomic_path(root / "samples.png", lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, "PNG"))


@dataclass
class TeacherCache:
    """Read access to a finished cache; shards are memory-mapped and loaded on first use."""

    root: Path
    manifest: dict[str, Any]
    num_classes: int

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
            self._shards[shard_id] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
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


def load_teacher_cache(
    root: str | Path, *, num_classes: int, expected: dict[str, Any] | None = None, verify: bool = True
) -> TeacherCache:
    """Open a finished cache, refusing one whose dependencies differ from ``expected``.

    Only the keys present in ``expected`` are compared, and inside ``teacher``/``vqgan`` a checksum of None means
    "not known here" and is not compared.

    Raises:
        CacheMismatchError: the cache is incomplete, a shard's checksum is wrong, or it was made from other inputs.
    """
    root = Path(root)
    manifest = _read_json(root / "manifest.json")
    if manifest is None:
        raise CacheMismatchError(f"{root}: no manifest.json; the cache is missing or incomplete (run cache-teacher)")
    for key, want in (expected or {}).items():
        have = manifest.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            diff = [k for k, v in want.items() if v is not None and have.get(k) != v]
        else:
            diff = [] if have == want else [key]
        if diff:
            raise CacheMismatchError(
                f"teacher cache {root} does not match the training config: {key} differs in {diff} "
                f"(cache: { {k: have.get(k) for k in diff} if isinstance(have, dict) else have }, "
                f"config: { {k: want.get(k) for k in diff} if isinstance(want, dict) else want }); rebuild the cache"
            )
    if verify:
        for name, info in manifest["shards"].items():
            path = root / f"{name}.pt"
            if not path.is_file():
                raise CacheMismatchError(f"{path}: missing; rerun cache-teacher")
            if sha256_file(path) != info["sha256"]:
                raise CacheMismatchError(f"{path}: checksum mismatch; delete it and rerun cache-teacher")
    return TeacherCache(root, manifest, num_classes)
