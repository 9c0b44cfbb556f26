"""Where the tensor RandAugment's time goes: each op of timm's ``rand-...-inc1`` policy on a batch, timed alone.

Prints one row per op (ms per ``rand_augment`` call on ``--images`` images of ``--size`` px, all drawn that op in
one layer; CUDA events on a GPU, CPU time otherwise), and a ``geometric, merged`` row (the five geometric ops spread
over the images: a layer resamples them together). Then, for the whole step, ``apply_views`` on a batch of clean +
DAD images with and without RandAugment, with the draws made ahead as the loader workers make them, timed back to
back as the training loop runs it, how many tensor ops each makes on the device (each a launch on a GPU unless
it is a view, and the host's time per launch is the cost), and how far its pixels are from the same step on the CPU.

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
from dad_core.randaugment import parse_randaugment  # noqa: E402

POLICY = "rand-m9-mstd0.5-inc1"


def _forced(ops: list[tuple[str, float]], images: int) -> torch.Tensor:
    """Draws (``encode_ops`` rows) that give image i op ``ops[i % len(ops)]`` in the first layer and none in the
    second: one op's group, or a mix, run by the batched path as a training step runs it."""
    names = parse_randaugment(POLICY).ops
    rows = [[[names.index(ops[i % len(ops)][0]), ops[i % len(ops)][1]], [-1, 0.0]] for i in range(images)]
    return torch.tensor(rows, dtype=torch.float64)


def count_device_ops(fn, device: torch.device) -> int:
    """How many tensor ops ``fn()`` runs that make a tensor on ``device`` (views included): on a GPU each one that is
    not a view is a kernel launch, and the host's time per op is what a small batch costs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += any(isinstance(t, torch.Tensor) and t.device == device for t in tree_leaves(out))
            return out

    with Count() as counter:
        fn()
    return counter.n


def run(args: argparse.Namespace) -> dict:
    from bench.training import replay_batch
    from dad_core.randaugment import _GEOMETRIC, rand_augment
    from dad_core.views import apply_views

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # a device index, so that count_device_ops compares equal devices
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=gen).div(255).to(device)
    rows = []
    names = parse_randaugment(POLICY).ops
    # a mid-range argument: 4.5 degrees, 0.15 of a shear or translation, 2 for the rest (bits, level or factor)
    arg = {name: 4.5 if name == "Rotate" else 0.15 if name in _GEOMETRIC else 2.0 for name in names}
    cases = [(name, [(name, arg[name])]) for name in names]
    geometric = [(name, arg[name]) for name in names if name in _GEOMETRIC]
    for label, ops in [*cases, ("geometric, merged", geometric)]:
        drawn = _forced(ops, args.images)
        timing = common.time_fn(
            lambda d=drawn: rand_augment(x, None, POLICY, drawn=d), device, warmup=2, iters=args.iters
        )
        rows.append({"op": label, "ms": round(timing.median_s * 1e3, 3)})
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
    replay_ops = count_device_ops(lambda: apply_views(images, views, args.size), device)
    with_randaugment = count_device_ops(
        lambda: apply_views(images, views, args.size, randaugment=POLICY, drawn=drawn), device
    )
    # the same step on the host's CPU: on a CPU the batched resize is bit-identical to torch's, on a GPU it may differ
    # in a value's last bit (and RandAugment's value maps can move that across a uint8 level); how far it goes there
    host = [image.cpu() for image in images]
    vs_cpu = {}
    for label, policy in (("replay", ""), ("replay+randaugment", POLICY)):
        got = apply_views(images, views, args.size, randaugment=policy, drawn=drawn if policy else None)
        want = apply_views(host, views, args.size, randaugment=policy, drawn=drawn if policy else None)
        diff = torch.stack([(g.cpu() - w).abs() for g, w in zip(got, want)])
        vs_cpu[label] = {"max_abs": float(diff.max()), "share_equal": round(float((diff == 0).float().mean()), 6)}
    return {
        "device": str(device),
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "ops": rows,
        "steps_ms": steps,
        "device_ops": {"replay": replay_ops, "replay+randaugment": with_randaugment},
        "vs_cpu": vs_cpu,
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
    print("tensor ops on the device per step (views included):", result["device_ops"])
    print("against the same step on the CPU:", result["vs_cpu"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
