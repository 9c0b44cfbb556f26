"""What the teacher cache costs as the work grows: bytes per image, storage and traffic for ImageNet-1k.

The byte count follows the shard format that ``dad_core.teacher_cache._make_shard`` writes (per image):

* ``clean``, ``dad``: uint8 ``[3, S, S]`` each                      -> 2 * 3 * S^2
* ``labels``, ``indices``: int64 each                                -> 16
* ``{clean,dad}_topv`` fp16 ``[k]`` + ``{clean,dad}_topi`` int16 ``[k]`` (int32 from 32,768 classes)
                                                                     -> 2 * k * (2 + 2)
* ``views``: int64 ``[R, 6]`` (top, left, height, width, flip, seed) -> 48 * R
* ``view_{clean,dad}_topv`` fp16 ``[R, k]`` + ``view_{clean,dad}_topi`` int16 ``[R, k]`` -> 2 * R * k * (2 + 2)

``torch.save`` adds a few hundred bytes per shard (zip headers, 64-byte alignment): 0.3 % at 32 px, less at 224.
``tests/test_bench.py`` checks the formula against a shard made by ``_make_shard``.

    python bench/costs.py --gen-images-per-s 180 --train-images-per-s 1300 --gpus 1 8 64
"""

from __future__ import annotations

import argparse
from typing import Any

IMAGENET_TRAIN_IMAGES = 1_281_167


def cache_bytes_per_image(image_size: int = 224, topk: int = 10, views: int = 2, num_classes: int = 1000) -> int:
    """Tensor bytes one training image takes in a cache shard (see the module docstring for the terms)."""
    index_bytes = 2 if num_classes < 2**15 else 4
    images = 2 * 3 * image_size**2
    ids = 8 + 8
    soft_labels = 2 * topk * (2 + index_bytes)
    view_table = 6 * 8 * views
    view_soft_labels = 2 * views * topk * (2 + index_bytes)
    return images + ids + soft_labels + view_table + view_soft_labels


def scale_out(
    gen_images_per_s: float | None,
    train_images_per_s: float | None,
    *,
    gpus: tuple[int, ...] = (1, 8, 64),
    images: int = IMAGENET_TRAIN_IMAGES,
    bytes_per_image: int | None = None,
) -> dict[str, Any]:
    """Storage, time and traffic for caching and training on ``images`` with perfect scaling across ``gpus``.

    Args:
        gen_images_per_s: cache generation throughput of one GPU (images/s), or None if unknown.
        train_images_per_s: cached-mode training throughput of one GPU (clean images/s), or None.
        gpus: GPU counts to tabulate.
        images: training-set size (ImageNet-1k: 1,281,167).
        bytes_per_image: cache bytes per image; default :func:`cache_bytes_per_image` at 224 px, k=10, R=2.

    Returns:
        ``{"bytes_per_image", "cache_bytes", "per_gpus": [{gpus, generation_h, epoch_h, ...}]}``.
    """
    per_image = bytes_per_image or cache_bytes_per_image()
    cache = per_image * images
    rows = []
    for g in gpus:
        rows.append(
            {
                "gpus": g,
                "generation_h": round(images / (g * gen_images_per_s) / 3600, 3) if gen_images_per_s else None,
                "epoch_h": round(images / (g * train_images_per_s) / 3600, 3) if train_images_per_s else None,
                # each epoch reads every sample's clean + DAD image and soft labels once, whatever the GPU count
                "epoch_read_gb": round(cache / 1e9, 1),
                "epoch_read_gb_per_s": round(cache / (images / (g * train_images_per_s)) / 1e9, 3)
                if train_images_per_s
                else None,
                # before step one: nothing with cache.verify lazy (the default: each shard hashed when first opened,
                # once per machine); the whole cache on rank 0 with cache.verify full
                "startup_verify_read_gb": 0.0,
                "startup_verify_read_gb_full": round(cache / 1e9, 1),
            }
        )
    return {
        "images": images,
        "bytes_per_image": per_image,
        "cache_bytes": cache,
        "cache_gb": round(cache / 1e9, 1),
        "cache_gib": round(cache / 2**30, 1),
        "per_gpus": rows,
    }


def format_scale_out(costs: dict[str, Any]) -> str:
    """A Markdown table of :func:`scale_out`'s result."""
    head = (
        f"{costs['images']:,} images x {costs['bytes_per_image']:,} B = {costs['cache_gb']:,} GB "
        f"({costs['cache_gib']:,} GiB) of cache"
    )
    lines = [
        head,
        "",
        "| GPUs | cache generation (h) | one epoch, cached (h) | cache read per epoch (GB) | "
        "read rate while training (GB/s) | start-up checksum reads (GB), verify lazy / full |",
        "|---|---|---|---|---|---|",
    ]
    for r in costs["per_gpus"]:
        cells = [
            r["gpus"],
            r["generation_h"],
            r["epoch_h"],
            r["epoch_read_gb"],
            r["epoch_read_gb_per_s"],
        ]
        verify = f"{r['startup_verify_read_gb']:,} / {r['startup_verify_read_gb_full']:,}"
        lines.append("| " + " | ".join(["–" if c is None else f"{c:,}" for c in cells] + [verify]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-images-per-s", type=float, help="cache generation images/s on one GPU")
    parser.add_argument("--train-images-per-s", type=float, help="cached training clean images/s on one GPU")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--images", type=int, default=IMAGENET_TRAIN_IMAGES)
    args = parser.parse_args(argv)
    per_image = cache_bytes_per_image(args.image_size, args.topk, args.views)
    print(
        format_scale_out(
            scale_out(
                args.gen_images_per_s,
                args.train_images_per_s,
                gpus=tuple(args.gpus),
                images=args.images,
                bytes_per_image=per_image,
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
