"""Shared pieces of the benchmarks: arguments, timing, precision switches, device facts, the teacher, output.

Timing: a few warm-up calls (the first one also pays for autotuning and ``torch.compile``), then the median of
``iters`` timed calls. On a GPU each call is timed with CUDA events and the device is synchronized after it, so
the time includes any gap where the GPU waits for Python; on the CPU ``time.perf_counter`` brackets the call. A
benchmark may time ``chain`` calls back to back instead (the training steps: a loop that does not wait per step).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COMPILE_MODES",
    "Timing",
    "add_common_args",
    "add_row_ratios",
    "create_teacher",
    "device_info",
    "finish",
    "format_result",
    "format_table",
    "fp32_precision",
    "free_memory",
    "measure",
    "precision_state",
    "ratio_entry",
    "resolve_device",
    "selected_rows",
    "setup",
    "split_compile_mode",
    "time_fn",
    "to_json",
]

_TEACHERS: dict[tuple, nn.Module] = {}  # built teachers, reused within a process (they are frozen)
ROW_COLUMNS = (
    "name",
    "batch_size",
    "dtype",
    "channels_last",
    "compile",
    "images_per_s",
    "ms_per_step",
    "ratio",
    "compile_s",
)


# Row-name suffixes of the torch.compile rows and the mode each passes to ``torch.compile``: ``max-autotune``
# benchmarks Triton/cuBLAS kernel choices while compiling (minutes on the full shapes), ``reduce-overhead``
# replays the compiled graphs as CUDA graphs (no per-kernel launch cost; needs static shapes, which these are).
COMPILE_MODES = {"-compiled": "default", "-autotune": "max-autotune", "-cudagraphs": "reduce-overhead"}


def split_compile_mode(name: str) -> tuple[str, str | None]:
    """``("product", "max-autotune")`` for ``product-autotune``; ``(name, None)`` for an uncompiled row."""
    for suffix, mode in COMPILE_MODES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), mode
    return name, None


def add_common_args(parser: argparse.ArgumentParser, *, rows: tuple[str, ...], default_rows: tuple[str, ...]) -> None:
    """Arguments every benchmark takes; ``rows`` are the row names the script knows."""
    parser.add_argument(
        "--full",
        action="store_true",
        help="the real shapes (ViT-L-14 teacher, f8-16384 VQGAN, 224 px); meant for a GPU",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, help="override the batch size of the chosen configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls; the median is reported (default 5)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows to run, from {','.join(rows)} (default: {','.join(default_rows)}"
        " plus the -compiled rows with --compile)",
    )
    parser.add_argument(
        "--reference-precision",
        choices=("ieee", "tf32"),
        default="ieee",
        help="fp32 matmul/conv precision of the reference rows: ieee (TF32 off, as DESIGN §6 "
        "measured the reference) or tf32 (default: ieee)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")


def selected_rows(args: argparse.Namespace, known: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    """The rows to run, in the script's order; ``-compiled`` rows join the default with ``--compile``."""
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; choose from {list(known)}")
    else:
        wanted = list(default) + ([r for r in known if r.endswith("-compiled")] if args.compile else [])
    return [r for r in known if r in wanted]


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the device of ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    min_s: float
    first_s: float | None  # the first warm-up call: includes autotuning and compilation
    times_s: list[float]


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int, chain: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed (CUDA events on a GPU).

    With ``chain`` > 1 each timing covers that many back-to-back calls with no wait between them and reports their
    mean: a loop that never waits for the GPU queues the next call's host work (Python, kernel launches) while the
    GPU still runs the previous one, which a wait after every call would expose.
    """
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(max(iters, 1)):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(chain):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000.0 / chain)
        else:
            start = time.perf_counter()
            for _ in range(chain):
                fn()
            times.append((time.perf_counter() - start) / chain)
    return Timing(statistics.median(times), min(times), first, times)


def _has_new_precision_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def precision_state() -> dict[str, Any]:
    """The fp32 matmul/conv precision in force (TF32 or IEEE), read through the API this torch has."""
    if _has_new_precision_api():
        return {
            "matmul": torch.backends.cuda.matmul.fp32_precision,
            "cudnn_conv": torch.backends.cudnn.conv.fp32_precision,
        }
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


@contextlib.contextmanager
def fp32_precision(mode: str | None) -> Iterator[None]:
    """Within the block, fp32 matmuls and convolutions on CUDA run as ``ieee`` or ``tf32``; None changes nothing.

    Torch 2.9+ refuses a mix of the legacy ``allow_tf32`` flags and the new ``fp32_precision`` ones, so this uses
    whichever API the installed torch has, and restores the previous values afterwards.
    """
    if mode is None:
        yield
        return
    if _has_new_precision_api():
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy


@contextlib.contextmanager
def vqgan_precision(vqgan: nn.Module, precision: str) -> Iterator[None]:
    """Set ``vqgan.precision`` (``dad_core.vqgan.VQGAN``) for the block."""
    before = vqgan.precision
    vqgan.precision = precision
    try:
        yield
    finally:
        vqgan.precision = before


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: the benchmark that needs it reports the error
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: device name, memory, library versions, precision defaults."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "open_clip": _version("open_clip"),
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fp32_precision_defaults": precision_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    else:
        info["device_name"] = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return info


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def create_teacher(model_name: str, num_classes: int, device: torch.device, *, seed: int = 0) -> nn.Module:
    """A frozen CLIP teacher whose zero-shot head is random, built without running the text tower.

    ``dad_core.teacher.create_clip_teacher`` builds the head by encoding classes x templates with the text tower
    (ViT-L-14 with 1000 ImageNet classes x 80 templates: minutes). Throughput does not depend on the head's
    values, so this builds the same ``CLIPClassifier`` with ``build_head=False`` and fills the head with random unit
    rows: the same module, shapes and operations as the product's teacher, with random weights (``pretrained=None``).

    Args:
        model_name: open_clip model config (``ViT-L-14``, ``dad-tiny-clip``).
        num_classes: rows of the head (1000 for ImageNet).
        device: where the teacher lives.
        seed: seeds the tower's initialization and the head.

    Returns:
        The teacher, frozen and in eval mode (``dad_core.teacher.freeze``), taking ``[B, 3, H, W]`` in [0, 1]; the
        same object for the same arguments within a process (benchmarks must not modify it).
    """
    from dad_core.teacher import create_clip_classifier, freeze

    key = (model_name, num_classes, str(device), seed)
    if key in _TEACHERS:  # run_all builds ViT-L-14 once for the generation and training benchmarks
        return _TEACHERS[key]
    torch.manual_seed(seed)
    classifier = create_clip_classifier(
        model_name, None, [f"class {i}" for i in range(num_classes)], "plain", device=device, build_head=False
    )
    with torch.no_grad():
        head = torch.randn(classifier.head.shape, generator=torch.Generator().manual_seed(seed))
        classifier.head.copy_(F.normalize(head, dim=-1))
    _TEACHERS[key] = freeze(classifier)
    return _TEACHERS[key]


def measure(
    name: str,
    step: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    iters: int,
    images_per_step: int,
    chain: int = 1,
    **fields: Any,
) -> dict[str, Any]:
    """Time ``step`` and return one result row; an error (out of memory, say) becomes the row's ``error``.

    ``chain``: steps per timing, back to back (:func:`time_fn`); the row's times stay per step.
    """
    row: dict[str, Any] = {"name": name, **fields, "images_per_step": images_per_step}
    if chain > 1:
        row["chain"] = chain
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        timing = time_fn(step, device, warmup=warmup, iters=iters, chain=chain)
    except Exception as err:  # report and go on: one failing row must not lose the others
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        print(f"[bench] row {name} failed: {row['error']}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        free_memory(device)
        return row
    row.update(
        ms_per_step=round(timing.median_s * 1000, 3),
        ms_min=round(timing.min_s * 1000, 3),
        images_per_s=float(f"{images_per_step / timing.median_s:.4g}"),
        first_call_s=round(timing.first_s, 3) if timing.first_s is not None else None,
        times_ms=[round(t * 1000, 3) for t in timing.times_s],
    )
    if fields.get("compile") and timing.first_s is not None:
        row["compile_s"] = round(max(timing.first_s - timing.median_s, 0.0), 2)
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def _rate(rows: list[dict[str, Any]], name: str) -> float | None:
    row = next((r for r in rows if r["name"] == name), None)
    return row.get("images_per_s") if row else None


def ratio_entry(
    rows: list[dict[str, Any]], numerator: str, denominator: str, target: float | None = None, note: str = ""
) -> dict[str, Any]:
    """``images_per_s`` of one row over another's (None when either is missing or failed), against a target."""
    top, bottom = _rate(rows, numerator), _rate(rows, denominator)
    value = round(top / bottom, 3) if top and bottom else None
    meets = None if value is None or target is None else value >= target
    return {"name": f"{numerator} / {denominator}", "value": value, "target": target, "meets": meets, "note": note}


def add_row_ratios(rows: list[dict[str, Any]], baseline_of: Callable[[str], str | None]) -> None:
    """Set each row's ``ratio``: its images/s over its baseline row's (``baseline_of(name)``)."""
    for row in rows:
        base = baseline_of(row["name"])
        top, bottom = row.get("images_per_s"), _rate(rows, base) if base else None
        row["ratio"] = round(top / bottom, 3) if top and bottom else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = ROW_COLUMNS) -> str:
    """A Markdown table of ``rows`` (missing cells as –; a failed row shows its error)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.get("error"):
            cells = [_cell(row.get(columns[0]))] + [f"FAILED: {row['error'][:80]}"] + [""] * (len(columns) - 2)
        else:
            cells = [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_result(result: dict[str, Any]) -> str:
    """The header line, the rows table and the ratios table of one benchmark's result."""
    info = result["device_info"]
    head = (
        f"## {result['benchmark']} — {info['device_name']}, torch {info['torch']}, "
        f"{'full' if result['config'].get('full') else 'tiny'} configuration"
    )
    parts = [head, "", format_table(result["rows"])]
    if result.get("ratios"):
        parts += ["", format_table(result["ratios"], ("name", "value", "target", "meets", "note"))]
    return "\n".join(parts)


def parse_args(
    argv: list[str] | None, *, doc: str, rows: tuple[str, ...], default_rows: tuple[str, ...], **extra: dict[str, Any]
) -> argparse.Namespace:
    """A benchmark's command line: the common arguments plus ``extra`` (``--name``: ``add_argument`` keywords)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser, rows=rows, default_rows=default_rows)
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name}", **kwargs)
    return parser.parse_args(argv)


def finish(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the tables and agreement (unless ``--quiet``), write ``--json``; exit code 1 when a row failed."""
    if not args.quiet:
        print(format_result(result), flush=True)
        for key, agreement in result.items():
            if key.startswith("agreement_vs_") and agreement:
                print(f"\nagreement with {key.removeprefix('agreement_vs_')}:", to_json(agreement))
    if args.json:
        from dad_core.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 1 if any(r.get("error") for r in result["rows"]) else 0


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
