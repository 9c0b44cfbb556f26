"""Issue 15's three ImageNet-scale changes, each measured before/after side by side in one run (CPU-measurable).

Rows (``before`` | ``after``, and their ratio ``before / after``, so > 1 means the change pays):

* ``cache-open``: wall seconds of ``load_teacher_cache`` on a large synthetic cache (``--shards`` shards of
  ``--shard-images`` random uint8 images at ``--image-size`` px, in the layout ``teacher_cache._make_shard`` writes,
  with sidecars and a manifest). Before: ``verify="full"`` (rank 0 hashed every shard before step one); after:
  ``verify="lazy"`` (a ``stat`` per shard; each shard is hashed when a process first opens it). The shards were just
  written, so the full read comes from the page cache: on a real store it is slower still.
* ``loader``: loader CPU seconds per image (``time.process_time`` of one process, one torch thread, the way a
  loader worker runs), over a ``DataLoader(num_workers=0)`` on that cache in cached mode. Before: views replayed in
  the loader (``apply_view``: crop, antialiased resize, flip, float conversion); after:
  ``train.replay_on_device`` (the loader copies uint8 images and the view rows). ``device_replay_ms_per_image`` is
  the replay those images then need (``train_data.replay_views``) on ``--device``: on a CPU it is CPU time, a
  stand-in; on a GPU it is synchronized wall time on the training device, not in a loader worker.
* ``loader, RandAugment``: the same with the README recipe's ``rand-m9-mstd0.5-inc1``. Before: timm's PIL
  RandAugment after each replayed view in the loader (``randaugment_backend: pil``); after: the tensor backend,
  replayed on the device with the views (``device_replay_randaugment_ms_per_image``).
* ``quantizer``: CPU ms per call (one thread, the fastest of ``--repeats``) of the nearest-code search for
  ``--quant-rows`` latent vectors (f8-16384: 784 per 224-px image) against a ``--codes`` x ``--code-dim`` codebook.
  Before: taming's three-step distance (``||z||^2 + ||e||^2 - 2 z.e``, three full-size passes); after:
  ``vqgan.nearest_code_indices`` (one ``addmm``); also the explicit-difference distance (``naive``), the codes of
  all three compared.

    python bench/throughput.py                       # 200 shards x 12 images at 224 px (about 730 MB in a temp dir)
    python bench/throughput.py --shards 4 --shard-images 4 --image-size 32 --quiet   # the test's size
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file (python bench/throughput.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_synthetic_cache(root: Path, *, shards: int, shard_images: int, image_size: int, views: int = 2) -> int:
    """A finished teacher cache of random contents in the real layout (shards, sidecars, manifest); returns bytes."""
    from dad_core.io import atomic_write_json, save_torch, sha256_file

    root.mkdir(parents=True, exist_ok=True)
    gen, k, n, s = torch.Generator().manual_seed(0), 10, shard_images, image_size
    sidecars, total = {}, 0
    for shard_id in range(shards):
        shard = {
            "clean": torch.randint(0, 256, (n, 3, s, s), generator=gen, dtype=torch.uint8),
            "dad": torch.randint(0, 256, (n, 3, s, s), generator=gen, dtype=torch.uint8),
            "labels": torch.randint(0, 1000, (n,), generator=gen),
            "indices": torch.arange(shard_id * n, (shard_id + 1) * n),
        }
        for name in ("clean", "dad"):
            shard[f"{name}_topv"] = torch.rand(n, k, generator=gen).half() / k
            shard[f"{name}_topi"] = torch.randint(0, 1000, (n, k), generator=gen, dtype=torch.int16)
            shard[f"view_{name}_topv"] = torch.rand(n, views, k, generator=gen).half() / k
            shard[f"view_{name}_topi"] = torch.randint(0, 1000, (n, views, k), generator=gen, dtype=torch.int16)
        side = torch.randint(s // 2, s + 1, (n, views, 2), generator=gen)
        corner = (torch.rand(n, views, 2, generator=gen) * (s - side + 1)).long()
        flip = torch.randint(0, 2, (n, views, 1), generator=gen)
        seed = torch.randint(0, 2**31 - 1, (n, views, 1), generator=gen)  # draws the RandAugment ops of a view
        shard["views"] = torch.cat([corner, side, flip, seed], dim=-1)
        path = root / f"shard-{shard_id:05d}.pt"
        save_torch(shard, path)
        info = {"shard": shard_id, "start": shard_id * n, "count": n, "sha256": sha256_file(path)}
        sidecars[f"shard-{shard_id:05d}"] = {**info, "bytes": path.stat().st_size}
        atomic_write_json(path.with_suffix(".json"), sidecars[f"shard-{shard_id:05d}"])
        total += path.stat().st_size
    manifest = {
        "shard_size": n,
        "num_samples": shards * n,
        "num_shards": shards,
        "views": {"views": views, "topk": k},
        "shards": sidecars,
    }
    atomic_write_json(root / "manifest.json", manifest)
    return total


def _cache_open(root: Path, repeats: int) -> dict[str, float]:
    from dad_core.teacher_cache import load_teacher_cache

    out = {}
    for mode in ("full", "lazy"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            load_teacher_cache(root, num_classes=1000, verify=mode)
            times.append(time.perf_counter() - start)
        out[mode] = min(times)
    return out


def _replay_seconds(
    batches: list[dict[str, torch.Tensor]], image_size: int, device: torch.device, randaugment: str
) -> float:
    """Seconds of ``replay_views`` over ``batches`` on ``device`` (CPU time on a CPU; synchronized wall on a GPU)."""
    from dad_core.train_data import REPLAY_HOST_KEYS, replay_views

    on_gpu = device.type == "cuda"
    moved = [{k: v if k in REPLAY_HOST_KEYS else v.to(device) for k, v in b.items()} for b in batches]
    replay_views(moved[0], image_size, randaugment=randaugment)  # warm-up (kernel selection, allocator)
    if on_gpu:
        torch.cuda.synchronize(device)
    clock = time.perf_counter if on_gpu else time.process_time
    start = clock()
    for batch in moved:
        replay_views(batch, image_size, randaugment=randaugment)
    if on_gpu:
        torch.cuda.synchronize(device)
    return clock() - start


def _loader_cpu_per_image(
    root: Path, image_size: int, images: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from dad_core.teacher_cache import load_teacher_cache
    from dad_core.train_data import DADPairs

    out = {}
    variants = {  # name: (train.randaugment, its backend, train.replay_on_device)
        "cpu": ("", "pil", False),
        "device": ("", "pil", True),
        "cpu-randaugment": (RANDAUGMENT, "pil", False),  # timm's PIL ops in the loader (the README recipe before)
        "device-randaugment": (RANDAUGMENT, "tensor", True),
    }
    for name, (randaugment, backend, on_device) in variants.items():
        cache = load_teacher_cache(root, num_classes=1000, verify="none")  # hashing is the other row's business
        pairs = DADPairs(
            cache,
            image_size=image_size,
            seed=0,
            replay=True,
            with_teacher=True,
            crop_scale=(0.08, 1.0),
            hflip=0.5,
            randaugment=randaugment,
            randaugment_backend=backend,
            replay_on_device=on_device,
        )
        subset = torch.utils.data.Subset(pairs, range(min(images, len(pairs))))
        loader = DataLoader(subset, batch_size=batch_size, num_workers=0)
        for shard_id in range(cache.manifest["num_shards"]):  # open (mmap) every shard first: not replay cost
            cache.shard(shard_id)
        for _ in loader:  # a pass first, so that no variant pays the page faults of a first read for the others
            pass
        batches, start = [], time.process_time()
        for batch in loader:
            batches.append(batch)
        out[name] = (time.process_time() - start) / len(subset)
        if on_device:
            out[f"{name}-replay"] = _replay_seconds(batches, image_size, device, randaugment) / len(subset)
    return out


def _quantizer(rows: int, codes: int, dim: int, repeats: int) -> dict[str, Any]:
    from dad_core.vqgan import nearest_code_indices

    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(rows, dim, generator=gen), torch.randn(codes, dim, generator=gen) * 0.5
    chunk = max(1, (1 << 24) // codes)  # the product's chunking, for all three

    def three_step() -> torch.Tensor:
        code_sq = codebook.pow(2).sum(1)
        return torch.cat(
            [(p.pow(2).sum(1, keepdim=True) + code_sq - 2 * p @ codebook.t()).argmin(1) for p in z.split(chunk)]
        )

    def naive() -> torch.Tensor:
        return torch.cat([(p[:, None] - codebook[None]).pow(2).sum(-1).argmin(1) for p in z.split(64)])

    def fused() -> torch.Tensor:
        return nearest_code_indices(z, codebook)

    out: dict[str, Any] = {}
    for name, fn in (("naive", naive), ("three-step", three_step), ("fused", fused)):
        fn()
        times = []
        for _ in range(repeats):  # CPU time of this one-thread process: robust to other jobs on a shared machine
            start = time.process_time()
            codes_out = fn()
            times.append(time.process_time() - start)
        out[name], out[f"{name}_codes"] = min(times) * 1000, codes_out
    out["fused_equals_three_step"] = bool(torch.equal(out["fused_codes"], out["three-step_codes"]))
    out["fused_agrees_with_naive"] = float((out["fused_codes"] == out["naive_codes"]).float().mean())
    for name in ("naive", "three-step", "fused"):
        del out[f"{name}_codes"]
    return out


RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # the README's ImageNet recipe


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # a loader worker's setting; the quantizer rows compare like with like
    workdir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="dad-bench-cache-"))
    try:
        start = time.perf_counter()
        size = write_synthetic_cache(
            workdir, shards=args.shards, shard_images=args.shard_images, image_size=args.image_size
        )
        build_s = time.perf_counter() - start
        opened = _cache_open(workdir, args.repeats)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loader = _loader_cpu_per_image(workdir, args.image_size, args.loader_images, args.batch_size, device)
    finally:
        if not args.cache_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    quant = _quantizer(args.quant_rows, args.codes, args.code_dim, args.repeats)
    rows = [
        _row("cache-open (start-up)", "s", opened["full"], opened["lazy"], "verify=full", "verify=lazy"),
        _row("loader CPU per image", "ms", loader["cpu"] * 1e3, loader["device"] * 1e3, "CPU replay", "uint8 + views"),
        _row(
            "loader CPU per image, RandAugment",
            "ms",
            loader["cpu-randaugment"] * 1e3,
            loader["device-randaugment"] * 1e3,
            "CPU replay, timm's PIL RandAugment",
            "uint8 + views, tensor RandAugment on the device",
        ),
        _row("quantizer", "ms", quant["three-step"], quant["fused"], "three-step", "fused addmm"),
        _row("quantizer vs explicit distance", "ms", quant["naive"], quant["fused"], "explicit", "fused addmm"),
    ]
    return {
        "benchmark": "throughput",
        "config": {key: value for key, value in vars(args).items() if key not in ("json", "quiet")},
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "cache_bytes": size,
        "cache_build_s": round(build_s, 2),
        "rows": rows,
        "replay_device": str(device),
        "device_replay_ms_per_image": round(loader["device-replay"] * 1e3, 4),
        "device_replay_randaugment_ms_per_image": round(loader["device-randaugment-replay"] * 1e3, 4),
        "quantizer": {k: v for k, v in quant.items() if not isinstance(v, float) or k.startswith("fused_")},
    }


def _row(name: str, unit: str, before: float, after: float, before_label: str, after_label: str) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "before": round(before, 6),
        "after": round(after, 6),
        "before_is": before_label,
        "after_is": after_label,
        "ratio": round(before / max(after, 1e-12), 2),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"CPU: {result['cpu_model']}, torch {result['torch']}, 1 thread; cache {result['cache_bytes'] / 1e6:.0f} MB",
        "",
        "| row | before | after | unit | before / after |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['before']:.4g} ({r['before_is']}) | {r['after']:.4g} ({r['after_is']}) "
            f"| {r['unit']} | {r['ratio']} |"
        )
    where = result["replay_device"]
    lines.append(f"\nreplay_views on {where} (the device's share): {result['device_replay_ms_per_image']} ms/image")
    lines.append(
        f"replay_views with the tensor RandAugment ({RANDAUGMENT}) on {where}: "
        f"{result['device_replay_randaugment_ms_per_image']} ms/image"
    )
    lines.append(f"quantizer codes: {json.dumps(result['quantizer'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--shard-images", type=int, default=12, help="images per shard (12 at 224 px: 3.6 MB)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--loader-images", type=int, default=512, help="images the loader rows read")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quant-rows", type=int, default=4 * 784, help="latent vectors (784 per 224-px f8 image)")
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--code-dim", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many is reported")
    parser.add_argument("--device", help="where replay_views runs (default: cuda if available, else cpu)")
    parser.add_argument("--cache-dir", help="build the synthetic cache here and keep it (default: a temp dir)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if not args.quiet:
        print(format_table(result), flush=True)
    if args.json:
        from dad_core.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
