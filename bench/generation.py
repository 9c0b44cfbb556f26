"""DAD sample generation, the product's path against the reference's plain formulation, side by side.

One step = one batch of clean images through VQ -> one L2-PGD step on the teacher -> VQ -> teacher soft labels on
the clean and the DAD image (DESIGN §3.3). Rows:

* ``naive-fp32`` (the baseline): the reference's formulation, written out below: eager fp32 (IEEE unless
  ``--reference-precision tf32``), no channels_last, no compile, a codebook lookup that materializes the full
  ``[N, K]`` distance matrix ``z² + e² − 2ze`` (taming's ``VectorQuantizer``), the teacher run again for soft labels.
* ``naive-bf16``: the same code under bf16 autocast, the "naive DAD generation step" of DESIGN §6 (96 img/s on an
  H200). Its VQGAN runs in bf16, which the product deliberately does not do.
* ``product``: what ``dad_core`` runs when it caches (``teacher_cache._make_shard``): channels_last input, bf16
  autocast on a GPU, ``generate_dad_samples`` (whose ``VQGAN.reconstruct`` keeps fp32 with the default
  ``vqgan.precision: fp32`` and looks codes up in chunks), then the soft labels.
* ``product-bf16-decoder``, ``product-bf16``: the same with ``vqgan.precision`` ``bf16-decoder`` (same codes, the
  decoder in bf16) or ``bf16`` (encoder and decoder in bf16); on a CPU (no autocast) they run what ``product`` runs.
* ``cache-shard``: the product's whole per-shard computation, ``teacher_cache._make_shard`` on an in-memory batch:
  the above plus uint8 storage rounding, the soft labels of R stored views of both images (cropped on the device),
  and the attack-survival diagnostics on the share of images a 1,024-image shard gives them (2 of 64).
* ``product-compiled``, ``product-bf16-decoder-compiled``, ``product-bf16-compiled`` (``--compile``): the product
  rows with ``torch.compile`` on the VQGAN encoder/decoder and teacher, what ``cache.compile: true`` does (the other
  rows are ``cache.compile: false``).
* ``cache-shard-bf16-compiled`` (``--compile``): ``cache-shard`` with ``cache.compile: true`` and
  ``vqgan.precision: bf16``, the fastest settings on the whole shard (views and storage included).
* ``product-autotune``, ``product-bf16-autotune``, ``product-cudagraphs``, ``product-bf16-cudagraphs`` (``--rows``,
  or ``run_all --compile`` while the budget lasts): the compiled rows with the VQGAN encoder/decoder compiled with
  ``mode="max-autotune"`` or ``mode="reduce-overhead"`` (CUDA graphs) instead of the default mode; GPU rows.

Agreement with ``naive-fp32`` on the same batch and random start: max/mean abs difference of the DAD images, and
the fraction of VQ codes that agree for ``VQ(x)`` and for the final ``VQ(x_adv)`` (near-ties may differ).

    python bench/generation.py                      # CPU, tiny configuration, seconds
    python bench/generation.py --full --json gen.json   # GPU: ViT-L-14 teacher, f8-16384 VQGAN, 224 px, batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python bench/generation.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402

# product rows and the vqgan.precision they run with
PRODUCT_PRECISION = {"product": "fp32", "product-bf16-decoder": "bf16-decoder", "product-bf16": "bf16"}
DEFAULT_ROWS = ("naive-fp32", "naive-bf16", *PRODUCT_PRECISION, "cache-shard")
COMPILED_ROWS = (
    *(f"{name}-compiled" for name in PRODUCT_PRECISION),
    "cache-shard-bf16-compiled",  # the whole shard as cache.compile: true with vqgan.precision: bf16 runs it
    *(f"{name}-{mode}" for mode in ("autotune", "cudagraphs") for name in ("product", "product-bf16")),
)
SHARD_PRECISION = {"cache-shard": "fp32", "cache-shard-bf16": "bf16"}  # cache-shard rows and their vqgan.precision
ROWS = (*DEFAULT_ROWS, *COMPILED_ROWS)
BASELINE = "naive-fp32"
TARGET = 2.5  # DESIGN §6: DAD sample generation at least 2.5x the naive step on the same GPU
TINY = dict(teacher="dad-tiny-clip", num_classes=10, vqgan="tiny-f4", image_size=32, batch_size=16, views=2)
FULL = dict(teacher="ViT-L-14", num_classes=1000, vqgan="f8-16384", image_size=224, batch_size=64, views=2)


# ---------------------------------------------------------------------------------------------------------------
# The reference's formulation, written plainly (the baseline)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def naive_reconstruct(vqgan: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """VQGAN round trip as the reference writes it: one full ``[N, K]`` distance matrix, then argmin.

    Args:
        vqgan: a ``dad_core.vqgan.VQGAN`` (only its encoder, convs, codebook and decoder are used).
        images: ``[B, 3, H, W]`` in [0, 1].

    Returns:
        ``([B, 3, H, W]`` fp32 reconstruction in [0, 1], ``[B, h, w]`` code indices).
    """
    z = vqgan.quant_conv(vqgan.encoder(images * 2 - 1))
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    codebook = vqgan.codebook.weight
    distances = flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * flat @ codebook.t()
    indices = distances.argmin(dim=1)
    codes = codebook[indices].view(b, h, w, d).permute(0, 3, 1, 2)
    out = vqgan.decoder(vqgan.post_quant_conv(codes.to(z.dtype)))
    return ((out.clamp(-1, 1) + 1) / 2).float(), indices.view(b, h, w)


def _l2(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def naive_pgd(
    teacher: nn.Module,
    centre: Tensor,
    labels: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: float,
    generator: torch.Generator,
) -> Tensor:
    """L2 PGD on the teacher's cross-entropy around ``centre``, drawing random numbers in the product's order."""
    adv = centre.clone()
    if torch.rand((), generator=generator, device=generator.device).item() < random_start:
        noise = torch.randn(centre.shape, generator=generator, device=centre.device, dtype=centre.dtype)
        adv = (centre + eps * noise / _l2(noise)).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(teacher(adv).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step_size * grad / _l2(grad)
        delta = adv - centre
        adv = (centre + delta * (eps / _l2(delta)).clamp(max=1.0)).clamp(0, 1)
    return adv.detach()


def naive_step(
    teacher: nn.Module,
    vqgan: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack,
    temperature: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """VQ -> PGD -> VQ -> soft labels of the clean and DAD image (the teacher run again for both)."""
    x0, codes_x0 = naive_reconstruct(vqgan, images)
    adv = naive_pgd(
        teacher,
        x0,
        labels,
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        random_start=attack.random_start,
        generator=generator,
    )
    dad, codes_dad = naive_reconstruct(vqgan, adv)
    with torch.no_grad():
        p_clean = F.softmax(teacher(images).float() / temperature, dim=-1)
        p_dad = F.softmax(teacher(dad).float() / temperature, dim=-1)
    return {"dad": dad, "p_clean": p_clean, "p_dad": p_dad, "codes_x0": codes_x0, "codes_dad": codes_dad}


# ---------------------------------------------------------------------------------------------------------------
# The product's path
# ---------------------------------------------------------------------------------------------------------------


def product_step(
    teacher: nn.Module,
    vqgan: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack,
    temperature: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``generate_dad_samples`` + soft labels, with the cache's settings: channels_last and bf16 autocast on a GPU."""
    from dad_core.attack import generate_dad_samples
    from dad_core.losses import soften

    on_gpu = images.device.type == "cuda"
    if on_gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_gpu):
        dad = generate_dad_samples(teacher, vqgan, images, labels, attack, generator=generator)
        with torch.no_grad():
            p_clean, p_dad = soften(teacher(images), temperature), soften(teacher(dad), temperature)
    return {"dad": dad, "p_clean": p_clean, "p_dad": p_dad}


@contextlib.contextmanager
def recorded_codes(vqgan: nn.Module) -> Iterator[list[Tensor]]:
    """Record the code indices the product's ``VQGAN.quantize`` picks, from the latents leaving ``quant_conv``."""
    from dad_core.vqgan import nearest_code_indices

    found: list[Tensor] = []

    def hook(module: nn.Module, inputs: Any, z: Tensor) -> None:
        b, d, h, w = z.shape
        found.append(nearest_code_indices(z.permute(0, 2, 3, 1).reshape(-1, d), vqgan.codebook.weight).view(b, h, w))

    handle = vqgan.quant_conv.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


@contextlib.contextmanager
def compiled(teacher: nn.Module, vqgan: nn.Module, vqgan_mode: str = "default") -> Iterator[nn.Module]:
    """``torch.compile`` the VQGAN encoder/decoder in place with ``vqgan_mode`` (restored on exit); yields the
    teacher compiled in the default mode."""
    encoder, decoder = vqgan.encoder, vqgan.decoder
    vqgan.encoder, vqgan.decoder = torch.compile(encoder, mode=vqgan_mode), torch.compile(decoder, mode=vqgan_mode)
    try:
        yield torch.compile(teacher)
    finally:
        vqgan.encoder, vqgan.decoder = encoder, decoder


def _agreement(reference: dict[str, Tensor], other: dict[str, Tensor]) -> dict[str, float]:
    diff = (other["dad"].float() - reference["dad"].float()).abs()
    out = {
        "dad_max_abs_diff": diff.max().item(),
        "dad_mean_abs_diff": diff.mean().item(),
        "p_clean_max_abs_diff": (other["p_clean"] - reference["p_clean"]).abs().max().item(),
    }
    for key in ("codes_x0", "codes_dad"):
        if key in other:
            out[f"{key}_agree"] = (other[key] == reference[key]).float().mean().item()
    return {k: round(v, 6) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------


def _cache_config(shape: dict[str, Any], batch_size: int):
    from dad_core.config import load_config

    crop = "[0.08, 1.0]" if shape["image_size"] >= 128 else "[0.35, 1.0]"
    return load_config(
        None,
        [
            f"data.image_size={shape['image_size']}",
            f"cache.views={shape['views']}",
            f"cache.batch_size={batch_size}",
            f"cache.shard_size={batch_size}",
            f"train.crop_scale={crop}",
            "train.hflip=0.5",
        ],
    )


RECIPE_SHARD_SIZE = 1024  # cache.shard_size of the README's ImageNet configuration


def diagnostic_images(batch_size: int) -> int:
    """Images the benchmark's one-batch shard diagnoses: the product diagnoses the first
    ``teacher_cache.DIAGNOSTIC_IMAGES`` (32) of each shard, 3 % of a 1,024-image shard; the same share of the batch
    (2 of 64), not 32 of 64, which would add a VQ round trip and four teacher forwards for half the batch."""
    from dad_core import teacher_cache

    return max(1, round(teacher_cache.DIAGNOSTIC_IMAGES * batch_size / RECIPE_SHARD_SIZE))


def _shard_step(teacher, vqgan, images: Tensor, labels: Tensor, cfg, device: torch.device):
    """The product's per-shard computation on an in-memory dataset of this batch (CPU images, as a loader gives),
    with the survival diagnostics on the share of images a recipe-sized shard gives them (:func:`diagnostic_images`)."""
    from dad_core import teacher_cache

    dataset = list(zip(images.cpu(), labels.cpu().tolist(), strict=True))
    share = diagnostic_images(len(dataset))

    def step():
        saved, teacher_cache.DIAGNOSTIC_IMAGES = teacher_cache.DIAGNOSTIC_IMAGES, share
        try:  # private: the benchmark times the product's own shard code
            return teacher_cache._make_shard(teacher, vqgan, dataset, list(range(len(dataset))), cfg, 0, device)
        finally:
            teacher_cache.DIAGNOSTIC_IMAGES = saved

    return step


def _bf16(step, device_type: str):
    """``step`` under bf16 autocast: the naive formulation as DESIGN §6 timed it."""

    def bf16_step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return step()

    return bf16_step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, time the selected rows, measure agreement; returns the JSON-able result."""
    from dad_core.vqgan import VQGAN

    device = common.setup(args)
    shape = dict(FULL if args.full else TINY)
    batch = args.batch_size or shape["batch_size"]
    cfg = _cache_config(shape, batch)
    start = time.perf_counter()
    teacher = common.create_teacher(shape["teacher"], shape["num_classes"], device, seed=args.seed)
    torch.manual_seed(args.seed)
    vqgan = VQGAN.from_config(shape["vqgan"]).to(device).eval().requires_grad_(False)
    build_s = time.perf_counter() - start
    data_gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(batch, 3, shape["image_size"], shape["image_size"], generator=data_gen).to(device)
    labels = torch.randint(0, shape["num_classes"], (batch,), generator=data_gen).to(device)
    generator = torch.Generator(device=device)

    def seeded(fn, model):
        def step():
            generator.manual_seed(args.seed)  # the same coin and random start in every call and every row
            return fn(model, vqgan, images, labels, cfg.attack, cfg.loss.temperature, generator)

        return step

    on_gpu = device.type == "cuda"
    ref_precision = args.reference_precision if on_gpu else None
    dtypes = {"naive-fp32": f"fp32 ({ref_precision or 'cpu'})", "naive-bf16": "bf16 autocast (VQGAN too)"}
    for name in (*PRODUCT_PRECISION, *COMPILED_ROWS, "cache-shard"):
        precision = {**PRODUCT_PRECISION, **SHARD_PRECISION}[common.split_compile_mode(name)[0]]
        dtypes[name] = f"bf16 autocast, VQGAN {precision}" if on_gpu else "fp32"
    rows, outputs = [], {}
    for name in common.selected_rows(args, ROWS, DEFAULT_ROWS):
        with contextlib.ExitStack() as stack:
            if name == "naive-fp32":
                stack.enter_context(common.fp32_precision(ref_precision))
                step = seeded(naive_step, teacher)
            elif name == "naive-bf16":
                step = _bf16(seeded(naive_step, teacher), device.type)
            elif name.startswith("cache-shard"):  # the product's own shard code, compiled (in a mode) or not
                base, mode = common.split_compile_mode(name)
                stack.enter_context(common.vqgan_precision(vqgan, SHARD_PRECISION[base]))
                model = stack.enter_context(compiled(teacher, vqgan, mode)) if mode else teacher
                step = _shard_step(model, vqgan, images, labels, cfg, device)
            else:  # product rows, with the vqgan.precision they name, compiled (in a mode) or not
                base, mode = common.split_compile_mode(name)
                stack.enter_context(common.vqgan_precision(vqgan, PRODUCT_PRECISION[base]))
                step = seeded(product_step, stack.enter_context(compiled(teacher, vqgan, mode)) if mode else teacher)
            rows.append(
                common.measure(
                    name,
                    step,
                    device,
                    warmup=args.warmup,
                    iters=args.iters,
                    images_per_step=batch,
                    batch_size=batch,
                    dtype=dtypes[name],
                    channels_last=on_gpu and name.startswith(("product", "cache")),
                    compile=common.split_compile_mode(name)[1] is not None,
                )
            )
            if name.startswith("naive"):
                outputs[name] = _safe(step)
            elif name.startswith("product"):
                outputs[name] = _with_codes(vqgan, step)
        common.free_memory(device)
    return _result(args, device, shape, batch, cfg, rows, outputs, build_s)


def _safe(step) -> dict[str, Tensor] | None:
    try:
        return step()
    except Exception as err:  # the timing row already carries the error
        print(f"[bench] agreement pass failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def _with_codes(vqgan: nn.Module, step) -> dict[str, Tensor] | None:
    with recorded_codes(vqgan) as codes:
        out = _safe(step)
    if out is not None and len(codes) == 2:
        out["codes_x0"], out["codes_dad"] = codes
    return out


def baseline_of(name: str) -> str:
    """The row each row's ``ratio`` column divides by."""
    return BASELINE


def ratios(rows: list[dict[str, Any]], on_gpu: bool) -> list[dict[str, Any]]:
    """The named ratios of the rows present, with DESIGN §6's target where one applies."""
    out = []
    for name in (*PRODUCT_PRECISION, *COMPILED_ROWS, "cache-shard"):
        if any(r["name"] == name for r in rows):
            target = TARGET if not name.startswith("cache-shard") else None
            out.append(common.ratio_entry(rows, name, "naive-fp32", target, "baseline of the brief: fp32"))
            out.append(common.ratio_entry(rows, name, "naive-bf16", target, "DESIGN §6 naive step (bf16)"))
    return out


def _result(args, device, shape, batch, cfg, rows, outputs, build_s) -> dict[str, Any]:
    common.add_row_ratios(rows, baseline_of)
    reference = outputs.get(BASELINE)
    agreement = {
        name: _agreement(reference, out)
        for name, out in outputs.items()
        if reference is not None and out is not None and name != BASELINE
    }
    return {
        "benchmark": "generation",
        "unit": "clean images/s (each gives a DAD sample and soft labels for both)",
        "config": {
            "full": args.full,
            **shape,
            "batch_size": batch,
            "attack": dataclasses.asdict(cfg.attack),
            "temperature": cfg.loss.temperature,
            "topk": cfg.cache.topk,
            "warmup": args.warmup,
            "iters": args.iters,
            "reference_precision": args.reference_precision,
            "seed": args.seed,
        },
        "device_info": common.device_info(device),
        "build_s": round(build_s, 2),
        "rows": rows,
        "ratios": ratios(rows, device.type == "cuda"),
        "agreement_vs_naive_fp32": agreement,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return common.parse_args(argv, doc=__doc__, rows=ROWS, default_rows=DEFAULT_ROWS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return common.finish(run(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
