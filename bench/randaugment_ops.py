"""Where the tensor RandAugment's time goes: each op of timm's ``rand-...-inc1`` policy on a batch, timed alone.

Prints one row per op (ms per call on ``--images`` images of ``--size`` px, CUDA events on a GPU, CPU time
otherwise) and, for the whole step, ``apply_views`` on a batch of clean + DAD images with and without
RandAugment, timed back to back as the training loop runs it. The ops go through
``dad_core.randaugment._apply``, the function the batched RandAugment calls per group of samples.

    python bench/randaugment_ops.py                       # GPU when there is one; 43 images (a layer's share)
    python bench/randaugment_ops.py --images 4 --size 32  # the test's size
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python bench/randaugment_ops.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402

POLICY = "rand-m9-mstd0.5-inc1"


def run(args: argparse.Namespace) -> dict:
    from dad_core.randaugment import _apply, parse_randaugment
    from dad_core.views import apply_views, sample_view

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=gen).float().to(device)
    arg = torch.full((args.images,), 0.5, dtype=torch.float64, device=device)
    rows = []
    for name in parse_randaugment(POLICY).ops:
        op_arg = arg * (30.0 if name == "Rotate" else 0.3 if name.startswith(("Shear", "Translate")) else 4.0)
        timing = common.time_fn(lambda n=name, a=op_arg: _apply(n, x, a), device, warmup=2, iters=args.iters)
        rows.append({"op": name, "ms": round(timing.median_s * 1e3, 3)})
    # the whole replay, as a training step makes it: B clean + B DAD images, uint8 stored images, view rows on the host
    rng = np.random.default_rng(0)
    views = []
    for _ in range(args.batch):
        v = sample_view(args.size, args.size, rng, scale=(0.08, 1.0), hflip=0.5)
        views.append([v.top, v.left, v.height, v.width, int(v.flip), v.seed])
    views = torch.tensor(views)
    images = [torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8).to(device) for _ in "cd"]
    steps = {}
    for label, policy in (("replay", ""), ("replay+randaugment", POLICY)):
        timing = common.time_fn(
            lambda p=policy: apply_views(images, views, args.size, randaugment=p),
            device,
            warmup=2,
            iters=args.iters,
            chain=args.chain,
        )
        steps[label] = round(timing.median_s * 1e3, 3)
    return {
        "device": str(device),
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "ops": rows,
        "steps_ms": steps,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=43, help="images per op call (a layer's share of 256: 256/2/3)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128, help="samples of the whole-step rows (x2: clean and DAD)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--chain", type=int, default=4)
    parser.add_argument("--device")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = run(args)
    for row in sorted(result["ops"], key=lambda r: -r["ms"]):
        print(f"{row['op']:>22} {row['ms']:9.3f} ms")
    print("whole step (ms):", result["steps_ms"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
