"""VQGAN round trip (``reconstruct``): the reference's eager fp32 against the product's path, side by side.

Rows:

* ``reference``: eager fp32 (IEEE unless ``--reference-precision tf32``), NCHW, the full ``[N, K]`` distance matrix
  (``bench.generation.naive_reconstruct``, taming's ``VectorQuantizer``).
* ``product``: ``VQGAN.reconstruct`` called as the cache calls it with the default ``vqgan.precision: fp32``:
  channels_last input inside a bf16 autocast region on a GPU; ``reconstruct`` switches autocast off and runs the
  network in fp32 (bf16 latents flip near-tie codes), with the codebook distance in fp32 chunks
  (``nearest_code_indices``); fp32 convolutions follow torch's defaults (TF32 on Ampere and later).
* ``bf16-decoder``: ``vqgan.precision: bf16-decoder``: the encoder and the code choice in fp32, only the decoder (two
  thirds of the f8 FLOPs, and no influence on which codes a round trip picks) in bf16.
* ``bf16``: ``vqgan.precision: bf16``: encoder and decoder in bf16, codebook distance still fp32. The agreement
  columns show what it changes.
* ``product-compiled``, ``bf16-compiled`` (``--compile``): the same with ``torch.compile`` on encoder and decoder.
* ``product-autotune``, ``bf16-autotune``, ``product-cudagraphs``, ``bf16-cudagraphs`` (``--rows``, or ``run_all
  --compile`` while the budget lasts): ``torch.compile(mode="max-autotune")`` (kernel choices benchmarked while
  compiling) and ``mode="reduce-overhead"`` (the compiled graphs replayed as CUDA graphs) on encoder and decoder.
  GPU rows: on a CPU they compile but say nothing about the GPU.

Agreement with ``reference``: max/mean abs pixel difference and the fraction of codes that agree.

    python bench/vqgan.py                        # CPU, tiny-f4 at 32 px
    python bench/vqgan.py --full --json vq.json  # GPU: f8-16384 at 224 px, batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python bench/vqgan.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402
from bench.generation import naive_reconstruct  # noqa: E402

ROWS = (
    "reference",
    "product",
    "bf16-decoder",
    "bf16",
    "product-compiled",
    "bf16-compiled",
    "product-autotune",
    "bf16-autotune",
    "product-cudagraphs",
    "bf16-cudagraphs",
)
DEFAULT_ROWS = ("reference", "product", "bf16-decoder", "bf16")
BASELINE = "reference"
TINY = dict(vqgan="tiny-f4", image_size=32, batch_size=16)
FULL = dict(vqgan="f8-16384", image_size=224, batch_size=64)


def product_reconstruct(vqgan: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """The product's call: channels_last input, inside the cache's bf16 autocast region on a GPU."""
    on_gpu = images.device.type == "cuda"
    if on_gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_gpu):
        return vqgan.reconstruct(images), None


def precision_reconstruct(precision: str):
    """The product's call with ``vqgan.precision`` set, under bf16 autocast on every device (so a CPU shows the
    numerical effect too; the cache itself enables autocast on GPUs only)."""

    def reconstruct(vqgan: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with common.vqgan_precision(vqgan, precision), torch.autocast(images.device.type, dtype=torch.bfloat16):
            return vqgan.reconstruct(images), None

    return reconstruct


@contextlib.contextmanager
def compiled_network(vqgan: nn.Module, mode: str = "default") -> Iterator[None]:
    """``torch.compile(mode=mode)`` the encoder and decoder in place, restored on exit."""
    encoder, decoder = vqgan.encoder, vqgan.decoder
    vqgan.encoder, vqgan.decoder = torch.compile(encoder, mode=mode), torch.compile(decoder, mode=mode)
    try:
        yield
    finally:
        vqgan.encoder, vqgan.decoder = encoder, decoder


def _codes_of(vqgan: nn.Module, fn, images: Tensor) -> tuple[Tensor, Tensor]:
    """Output and code indices of one call (indices recorded from ``quant_conv`` when ``fn`` does not return them)."""
    from bench.generation import recorded_codes

    with recorded_codes(vqgan) as found:
        out, indices = fn(vqgan, images)
    return out, indices if indices is not None else found[0]


def _agreement(reference: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> dict[str, float]:
    diff = (other[0].float() - reference[0].float()).abs()
    return {
        "max_abs_diff": round(diff.max().item(), 6),
        "mean_abs_diff": round(diff.mean().item(), 6),
        "codes_agree": round((other[1] == reference[1]).float().mean().item(), 6),
    }


def baseline_of(name: str) -> str:
    """The row each row's ``ratio`` column divides by."""
    return BASELINE


def ratios(rows: list[dict[str, Any]], on_gpu: bool) -> list[dict[str, Any]]:
    """Each row over the reference; bf16 over product (what the fp32 choice in ``reconstruct`` costs)."""
    names = [r["name"] for r in rows]
    out = [common.ratio_entry(rows, name, BASELINE) for name in ROWS if name in names and name != BASELINE]
    for fast, slow in (("bf16-decoder", "product"), ("bf16", "product"), ("bf16-compiled", "product-compiled")):
        if fast in names and slow in names:
            out.append(common.ratio_entry(rows, fast, slow, note="speed-up of vqgan.precision"))
    for base in ("product", "bf16"):
        for mode in ("autotune", "cudagraphs"):
            if f"{base}-{mode}" in names and f"{base}-compiled" in names:
                note = f"torch.compile mode {common.COMPILE_MODES['-' + mode]} over the default mode"
                out.append(common.ratio_entry(rows, f"{base}-{mode}", f"{base}-compiled", note=note))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the selected rows on one random batch; returns the JSON-able result."""
    from dad_core.vqgan import VQGAN

    device = common.setup(args)
    shape = dict(FULL if args.full else TINY)
    batch = args.batch_size or shape["batch_size"]
    wanted = common.selected_rows(args, ROWS, DEFAULT_ROWS)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    vqgan = VQGAN.from_config(shape["vqgan"]).to(device).eval().requires_grad_(False)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(batch, 3, shape["image_size"], shape["image_size"], generator=gen).to(device)
    on_gpu = device.type == "cuda"
    functions = {
        "reference": naive_reconstruct,
        "product": product_reconstruct,
        "bf16-decoder": precision_reconstruct("bf16-decoder"),
        "bf16": precision_reconstruct("bf16"),
    }
    dtypes = {
        "reference": f"fp32 ({args.reference_precision if on_gpu else 'cpu'})",
        "product": "fp32 (vqgan.precision fp32)",
        "bf16-decoder": "vqgan.precision bf16-decoder",
        "bf16": "vqgan.precision bf16",
    }
    rows, outputs = [], {}
    for name in wanted:
        base, mode = common.split_compile_mode(name)
        fn = functions[base]
        precision = args.reference_precision if on_gpu and base == "reference" else None
        network = compiled_network(vqgan, mode) if mode else contextlib.nullcontext()
        with common.fp32_precision(precision), network:
            rows.append(
                common.measure(
                    name,
                    lambda fn=fn: fn(vqgan, images),
                    device,
                    warmup=args.warmup,
                    iters=args.iters,
                    images_per_step=batch,
                    batch_size=batch,
                    dtype=dtypes[base],
                    channels_last=on_gpu and base != "reference",
                    compile=name != base,
                )
            )
            try:
                outputs[name] = _codes_of(vqgan, fn, images)
            except Exception as err:  # the timing row carries the error
                print(f"[bench] agreement pass of {name} failed: {err}", file=sys.stderr)
        common.free_memory(device)
    common.add_row_ratios(rows, baseline_of)
    agreement = {
        name: _agreement(outputs[BASELINE], out)
        for name, out in outputs.items()
        if name != BASELINE and BASELINE in outputs
    }
    return {
        "benchmark": "vqgan",
        "unit": "images/s through encode -> nearest code -> decode",
        "config": {
            "full": args.full,
            **shape,
            "batch_size": batch,
            "warmup": args.warmup,
            "iters": args.iters,
            "reference_precision": args.reference_precision,
            "seed": args.seed,
        },
        "device_info": common.device_info(device),
        "build_s": round(build_s, 2),
        "rows": rows,
        "ratios": ratios(rows, on_gpu),
        "agreement_vs_reference": agreement,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return common.parse_args(argv, doc=__doc__, rows=ROWS, default_rows=DEFAULT_ROWS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return common.finish(run(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
