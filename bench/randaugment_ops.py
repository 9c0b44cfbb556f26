"""Where the tensor RandAugment's time goes: each op of timm's ``rand-...-inc1`` policy on a batch, timed alone.

Prints one row per op (ms per call on ``--images`` images of ``--size`` px, CUDA events on a GPU, CPU time
otherwise) as the batched RandAugment runs it for a group of samples: the photometric ops through
``dad_core.randaugment._apply``, the geometric ones through ``_resample`` (a layer's geometric ops share one such
call, row ``geometric, merged``: the five ops' matrices on ``--images`` images). Then, for the whole step,
``apply_views`` on a batch of clean + DAD images with and without RandAugment, with the draws made ahead as the
loader workers make them, timed back to back as the training loop runs it.

    python bench/randaugment_ops.py                       # GPU when there is one; 9 images (a group's share)
    python bench/randaugment_ops.py --images 4 --size 32  # the test's size
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python bench/randaugment_ops.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402

POLICY = "rand-m9-mstd0.5-inc1"


def run(args: argparse.Namespace) -> dict:
    from bench.training import replay_batch
    from dad_core.randaugment import _GEOMETRIC, _affine_matrix, _apply, _resample, parse_randaugment
    from dad_core.views import apply_views

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=gen).float().to(device)
    arg = torch.full((args.images,), 0.5, dtype=torch.float64, device=device)
    rows, h, w = [], args.size, args.size
    for name in parse_randaugment(POLICY).ops:
        if name in _GEOMETRIC:
            a = arg * (30.0 if name == "Rotate" else 0.3)
            op = lambda n=name, a=a: _resample(x, _affine_matrix(n, a, h, w))  # noqa: E731
        else:
            op = lambda n=name: _apply(n, x, arg * 4.0)  # noqa: E731
        timing = common.time_fn(op, device, warmup=2, iters=args.iters)
        rows.append({"op": name, "ms": round(timing.median_s * 1e3, 3)})
    names = sorted(_GEOMETRIC)
    merged = torch.cat([_affine_matrix(names[i % 5], arg[i : i + 1] * 0.3, h, w) for i in range(args.images)])
    timing = common.time_fn(lambda: _resample(x, merged), device, warmup=2, iters=args.iters)
    rows.append({"op": "geometric, merged", "ms": round(timing.median_s * 1e3, 3)})
    # the whole replay, as a training step makes it: B clean + B DAD uint8 images, the view rows and their RandAugment
    # draws on the host (the loader workers made them)
    shape = (args.batch, 3, args.size, args.size)
    floats = {"clean": torch.rand(shape, generator=gen), "dad": torch.rand(shape, generator=gen)}
    batch = replay_batch({**floats, "label": torch.zeros(args.batch, dtype=torch.long)}, args.size, 0, POLICY)
    images, views, drawn = [batch[name].to(device) for name in floats], batch["view"], batch["randaugment"]
    steps = {}
    for label, policy in (("replay", ""), ("replay+randaugment", POLICY)):
        timing = common.time_fn(
            lambda p=policy: apply_views(images, views, args.size, randaugment=p, drawn=drawn if p else None),
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
    parser.add_argument("--images", type=int, default=9, help="images per op call (a group's share: 256 / 2 / 15)")
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
