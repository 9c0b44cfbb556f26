"""One student training step on the DAD loss: cached teacher vs online teacher vs a plain step vs the reference.

Each step takes B clean images and their B DAD samples (2B images through the student), as ``dad_core.train``
does, and includes backward and the AdamW update. Rows, per student:

* ``plain``: the ceiling, a student step on the same 2B images with cross-entropy only (no teacher, no KL).
* ``cached``: ``DADTask`` with ``teacher_mode: cached`` (stored soft labels in the batch; the teacher never runs).
* ``online``: ``DADTask`` with the teacher run on the clean and the DAD view every step (``teacher_mode: online``).
* ``reference``: the reference design: fp32 (IEEE unless ``--reference-precision tf32``), online teacher, no
  channels_last.
* ``cached-replay``: ``cached`` as ``train.replay_on_device: true`` runs it: the batch holds the stored uint8 images
  and a view row per sample (crop scale 0.08-1, flip 0.5), and the step makes the views first
  (``train_data.replay_views``: per-sample crop, antialiased resize, flip, on the training device).
* ``cached-replay-randaugment``: the same with ``rand-m9-mstd0.5-inc1`` and ``train.randaugment_backend: tensor``
  (the README's ImageNet recipe): the views' RandAugment runs in the step too.
* ``cached-compiled`` (``--compile``): ``cached`` with the student under ``torch.compile`` (``train.compile``).

The product rows use the product's own choices (``dad_core.train``): bf16 autocast and channels_last (model and
batch) on a GPU, its optimizer (timm's AdamW, fused on a GPU), loss terms not read back (the loop reads them
every 10 steps). Each timing covers ``--chain`` steps back to back (4 on a GPU), as the loop runs them: the host
queues a step's batch handling and launches while the GPU still runs the step before. Throughput is in clean
images/s (B per step, DESIGN §6's unit); ``student_images_per_s`` counts the 2B images.

    python bench/training.py                          # CPU, resnet10t student, tiny teacher, seconds
    python bench/training.py --full --json train.json # GPU: vit_base_patch16_224 and resnet50, ViT-L-14, B = 128
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python bench/training.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402

ROWS = ("plain", "cached", "cached-replay", "cached-replay-randaugment", "online", "reference", "cached-compiled")
DEFAULT_ROWS = ("plain", "cached", "cached-replay", "cached-replay-randaugment", "online", "reference")
# DESIGN §6: cached at least 0.9x plain, 1.8x online, 12x the reference design (on a GPU)
TARGETS = {"plain": 0.9, "online": 1.8, "reference": 12.0}
REPLAY_TARGET = 0.9  # issue 15: cached training with the views replayed on the device stays >= 0.9x the plain step
RANDAUGMENT = "rand-m9-mstd0.5-inc1"
TINY = dict(students=("resnet10t",), teacher="dad-tiny-clip", num_classes=10, image_size=32, batch_size=16)
FULL = dict(
    students=("vit_base_patch16_224", "resnet50"), teacher="ViT-L-14", num_classes=1000, image_size=224, batch_size=128
)


def _batch(
    batch_size: int, num_classes: int, size: int, temperature: float, device: torch.device, seed: int
) -> dict[str, Tensor]:
    """A batch as the loader yields it in cached mode: views in [0, 1], labels, teacher probabilities at T."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "clean": torch.rand(batch_size, 3, size, size, generator=gen),
        "dad": torch.rand(batch_size, 3, size, size, generator=gen),
        "label": torch.randint(0, num_classes, (batch_size,), generator=gen),
    }
    for key in ("t_clean", "t_dad"):
        batch[key] = F.softmax(torch.randn(batch_size, num_classes, generator=gen) * 3 / temperature, dim=-1)
    return {key: value.to(device) for key, value in batch.items()}


def replay_batch(batch: dict[str, Tensor], size: int, seed: int, randaugment: str = "") -> dict[str, Tensor]:
    """``batch`` as ``train.replay_on_device`` yields it: uint8 stored images, a ``[B, 6]`` view row each and, with
    ``randaugment``, the views' draws (``DADPairs`` makes them in the loader workers)."""
    from dad_core.randaugment import encode_ops
    from dad_core.views import sample_view

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch["label"].shape[0]):
        v = sample_view(size, size, rng, scale=(0.08, 1.0), hflip=0.5)
        rows.append([v.top, v.left, v.height, v.width, int(v.flip), v.seed])
    out = {key: value for key, value in batch.items() if key not in ("clean", "dad")}
    for name in ("clean", "dad"):
        out[name] = (batch[name] * 255).round().to(torch.uint8)
    out["view"] = torch.tensor(rows)  # on the host, as the loader yields it and the training step reads it
    if randaugment:
        out["randaugment"] = torch.stack([encode_ops(row[5], randaugment) for row in rows])
    return out


def _replay(size: int, randaugment: str, device: torch.device, channels_last: bool):
    """The views made from a replay batch on the device, before autocast, as ``dad_core.train._loop`` does with
    ``replay_on_device``."""
    from dad_core.train import _to_device  # private: the benchmark runs the product loop's own batch handling
    from dad_core.train_data import replay_views

    return lambda b: _to_device(replay_views(b, size, randaugment=randaugment), device, channels_last)


def _student(name: str, num_classes: int, size: int, device: torch.device, channels_last: bool, seed: int) -> nn.Module:
    from dad_core.student import create_student

    torch.manual_seed(seed)
    student = create_student(name, num_classes, image_size=size).to(device)
    return student.to(memory_format=torch.channels_last) if channels_last else student


def _optimizer(model: nn.Module, device: torch.device, *, product: bool) -> torch.optim.Optimizer:
    """The product's optimizer (``dad_core.train._build_optimization``: timm AdamW, fused on a GPU), or for the
    reference design timm's AdamW with torch's defaults."""
    from timm.optim import create_optimizer_v2

    from dad_core.config import load_config
    from dad_core.train import _build_optimization  # private: the benchmark uses the product's own choice

    if product:
        return _build_optimization(load_config(None), model, 1, device)[0]
    return create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05)


def _step_fn(
    forward: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    device: torch.device,
    *,
    autocast: bool,
    channels_last: bool,
    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
):
    """One step as ``dad_core.train._loop`` runs it: batch to device/format (the view rows stay on the host; then
    ``prepare``, e.g. the view replay, outside autocast), forward, backward, update. The loss is not read: the loop
    reads it every 10 steps, so its steps run back to back (timed with ``--chain``)."""
    from dad_core.train import _to_device  # private: the benchmark runs the product loop's own batch handling
    from dad_core.train_data import REPLAY_HOST_KEYS

    def step() -> Tensor:
        b = _to_device(batch, device, channels_last, host_keys=REPLAY_HOST_KEYS)
        if prepare is not None:
            b = prepare(b)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(b)
            out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"].detach()

    return step


def _plain_forward(student: nn.Module) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    def forward(b: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = student(torch.cat([b["clean"], b["dad"]]))
        return {"loss": F.cross_entropy(logits.float(), torch.cat([b["label"], b["label"]]))}

    return forward


def _task_forward(task: nn.Module, seed: int) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    rng = np.random.default_rng(seed)
    return lambda b: task(b, rng=rng)


def _row(
    kind: str,
    name: str,
    shape: dict[str, Any],
    teacher: nn.Module,
    batch: dict[str, Tensor],
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build a fresh student (same init) for one row, time its step, free it."""
    from dad_core.config import LossConfig
    from dad_core.task import DADTask

    on_gpu = device.type == "cuda"
    product = kind != "reference"
    channels_last = on_gpu and product
    student = _student(name, shape["num_classes"], shape["image_size"], device, channels_last, args.seed)
    student.train()
    optimizer = _optimizer(student, device, product=product)
    trained = torch.compile(student) if kind == "cached-compiled" else student
    if kind == "plain":
        forward = _plain_forward(trained)
    else:
        task = DADTask(
            trained,
            LossConfig(),
            num_classes=shape["num_classes"],
            teacher=teacher if kind in ("online", "reference") else None,
            label_smoothing=0.1,
        )
        task.train()
        forward = _task_forward(task, args.seed)
    replay = kind.startswith("cached-replay")
    prepare = None
    if replay:
        randaugment = RANDAUGMENT if kind.endswith("randaugment") else ""
        prepare = _replay(shape["image_size"], randaugment, device, channels_last)
        batch = replay_batch(batch, shape["image_size"], args.seed, randaugment)
    step = _step_fn(
        forward,
        optimizer,
        batch,
        device,
        autocast=on_gpu and product,
        channels_last=channels_last and not replay,
        prepare=prepare,
    )
    b = batch["label"].shape[0]
    dtype = "bf16 autocast" if on_gpu and product else "fp32" + (f" ({args.reference_precision})" if on_gpu else "")
    with common.fp32_precision(args.reference_precision if on_gpu and not product else None):
        row = common.measure(
            f"{name}/{kind}",
            step,
            device,
            warmup=args.warmup,
            iters=args.iters,
            chain=args.chain or (4 if on_gpu else 1),
            images_per_step=b,
            batch_size=b,
            dtype=dtype,
            channels_last=channels_last,
            compile=kind == "cached-compiled",
            teacher="online" if kind in ("online", "reference") else "none",
        )
    if "images_per_s" in row:
        row["student_images_per_s"] = row["images_per_s"] * 2
    del step, forward, optimizer, trained, student
    common.free_memory(device)
    return row


def baseline_of(name: str) -> str:
    """The row each row's ``ratio`` column divides by: the same student's reference row."""
    return f"{name.split('/')[0]}/reference"


def ratios(rows: list[dict[str, Any]], on_gpu: bool) -> list[dict[str, Any]]:
    """cached over plain, online and reference for each student, against DESIGN §6's targets."""
    names = [r["name"] for r in rows]
    out = []
    for student in dict.fromkeys(name.split("/")[0] for name in names):
        for other, target in TARGETS.items():
            if other == "reference" and not on_gpu:
                target = None  # a GPU target: on a CPU the product's bf16 and channels_last are off
            out.append(common.ratio_entry(rows, f"{student}/cached", f"{student}/{other}", target))
        for kind in ("cached-replay", "cached-replay-randaugment"):
            if f"{student}/{kind}" in names:
                target = REPLAY_TARGET if on_gpu else None  # a GPU target, like the reference's
                out.append(common.ratio_entry(rows, f"{student}/{kind}", f"{student}/plain", target))
                out.append(common.ratio_entry(rows, f"{student}/{kind}", f"{student}/cached"))
        if f"{student}/cached-compiled" in names:
            out.append(common.ratio_entry(rows, f"{student}/cached-compiled", f"{student}/cached"))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the teacher, time the selected rows for each student; returns the JSON-able result."""
    device = common.setup(args)
    shape = dict(FULL if args.full else TINY)
    if args.students:
        shape["students"] = tuple(s.strip() for s in args.students.split(",") if s.strip())
    batch_size = args.batch_size or shape["batch_size"]
    kinds = common.selected_rows(args, ROWS, DEFAULT_ROWS)
    start = time.perf_counter()
    needs_teacher = any(k in ("online", "reference") for k in kinds)
    teacher = (
        common.create_teacher(shape["teacher"], shape["num_classes"], device, seed=args.seed) if needs_teacher else None
    )
    build_s = time.perf_counter() - start
    batch = _batch(batch_size, shape["num_classes"], shape["image_size"], 4.0, device, args.seed)
    rows = [_row(kind, name, shape, teacher, batch, device, args) for name in shape["students"] for kind in kinds]
    common.add_row_ratios(rows, baseline_of)
    return {
        "benchmark": "training",
        "unit": "clean images/s (each step: B clean + B DAD images through the student)",
        "config": {
            "full": args.full,
            **shape,
            "batch_size": batch_size,
            "warmup": args.warmup,
            "iters": args.iters,
            "reference_precision": args.reference_precision,
            "seed": args.seed,
            "loss": "variant A, T=4",
        },
        "device_info": common.device_info(device),
        "build_s": round(build_s, 2),
        "rows": rows,
        "ratios": ratios(rows, device.type == "cuda"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    students = {"help": "comma-separated timm models (default: resnet10t; with --full vit_base_patch16_224,resnet50)"}
    chain = {
        "type": int,
        "help": "steps per timing, back to back as the training loop runs them (default: 4 on a GPU, 1 on a CPU)",
    }
    return common.parse_args(argv, doc=__doc__, rows=ROWS, default_rows=DEFAULT_ROWS, students=students, chain=chain)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return common.finish(run(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
