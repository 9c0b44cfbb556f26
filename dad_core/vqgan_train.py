"""Train a small VQGAN on the training images when no published checkpoint fits (DESIGN 2, ``train_vqgan``).

The objective is taming-transformers' VQGAN objective without the perceptual term (LPIPS needs downloaded VGG
weights): L1 + L2 reconstruction, the VQ-VAE codebook and commitment losses with a straight-through estimator
(van den Oord et al. 2017, eq. 3), and, when ``adversarial_weight > 0``, a hinge-loss patch discriminator (Esser et
al. 2021, eq. 5) switched on part-way through training. Codes that no input chose in the last ``restart_every`` steps
are re-seeded from encoder outputs of the current batch (as in Dhariwal et al. 2020, Jukebox); on small data sets
this is what keeps most of the codebook in use. The result is written in the published taming layout.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dad_core.config import VQGANConfig, VQGANTrainConfig
from dad_core.distributed import is_primary, resolve_device, set_seed
from dad_core.errors import DADError
from dad_core.io import atomic_path, sha256_file
from dad_core.vqgan import VQGAN

__all__ = ["evaluate_vqgan", "train_vqgan", "vqgan_losses"]

_logger = logging.getLogger(__name__)


class _PatchDiscriminator(nn.Sequential):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch, taking images in [-1, 1].

    GroupNorm instead of taming's BatchNorm so the logits of one image do not depend on the rest of the batch.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )


def vqgan_losses(model: VQGAN, images: Tensor, *, beta: float) -> dict[str, Tensor]:
    """Reconstruction and VQ losses of one batch (no adversarial term).

    ``loss = L1 + L2 (pixels in [-1, 1]) + ||sg[z] - e||^2 + beta * ||z - sg[e]||^2``. The decoder sees
    ``z + sg[e - z]`` (straight-through), so the reconstruction gradient reaches the encoder unchanged. Unlike
    taming's default ``legacy=True`` quantizer, beta weights the commitment term, as in the VQ-VAE paper.

    Args:
        model: the VQGAN being trained.
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        beta: commitment weight.

    Returns:
        ``loss``, the named terms, ``recon`` (``[B, 3, H, W]`` in ``[-1, 1]``), ``target`` (the input in
        ``[-1, 1]``), ``latents`` (``[B*h*w, D]``, detached) and ``indices`` (``[B, h, w]``).
    """
    target = images * 2 - 1
    z = model.encode(target)
    codes, indices = model.quantize(z)
    recon = model.decode(z + (codes - z).detach())
    terms = {
        "l1": F.l1_loss(recon, target),
        "l2": F.mse_loss(recon, target),
        "codebook": F.mse_loss(codes, z.detach()),
        "commitment": F.mse_loss(z, codes.detach()),
    }
    loss = terms["l1"] + terms["l2"] + terms["codebook"] + beta * terms["commitment"]
    latents = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return {"loss": loss, **terms, "recon": recon, "target": target, "latents": latents, "indices": indices}


@torch.no_grad()
def _restart_dead_codes(model: VQGAN, counts: Tensor, latents: Tensor) -> int:
    """Move every code with ``counts == 0`` onto a random latent of the batch (plus a little noise)."""
    dead = (counts == 0).nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    picks = torch.randint(0, latents.shape[0], (dead.numel(),), device=latents.device)
    new_codes = latents[picks] + 0.01 * latents.std() * torch.randn_like(latents[picks])
    model.codebook.weight[dead] = new_codes.to(model.codebook.weight.dtype)
    return dead.numel()


def _create_optimizer(module: nn.Module, tcfg: VQGANTrainConfig, total_steps: int):
    """AdamW with linear warm-up and cosine decay per step; no weight decay on the codebook, norms and biases."""
    decay = [p for n, p in module.named_parameters() if p.dim() > 1 and not n.startswith("codebook")]
    no_decay = [p for n, p in module.named_parameters() if p.dim() <= 1 or n.startswith("codebook")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr,
        betas=(0.9, 0.99),
    )
    warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Adversary:
    """The discriminator, its optimizer and the hinge losses (Lim & Ye 2017), active from ``start_step`` on."""

    def __init__(self, tcfg: VQGANTrainConfig, total_steps: int, device: torch.device) -> None:
        self.weight = tcfg.adversarial_weight
        self.start_step = int(tcfg.adversarial_start * total_steps)
        self.disc = _PatchDiscriminator().to(device)
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=tcfg.lr, betas=(0.5, 0.9), weight_decay=0.0)

    def generator_loss(self, recon: Tensor) -> Tensor:
        return -self.disc(recon).mean()

    def discriminator_step(self, real: Tensor, fake: Tensor) -> Tensor:
        loss = 0.5 * (F.relu(1 - self.disc(real)).mean() + F.relu(1 + self.disc(fake.detach())).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _train_step(model: VQGAN, images: Tensor, step: int, state: dict[str, Any], tcfg: VQGANTrainConfig) -> dict:
    """One optimizer step of the VQGAN (and of the discriminator when active); returns float losses."""
    out = vqgan_losses(model, images, beta=tcfg.beta)
    loss, adversary = out["loss"], state["adversary"]
    adversarial = adversary is not None and step >= adversary.start_step
    if adversarial:
        out["generator"] = adversary.generator_loss(out["recon"])
        loss = loss + adversary.weight * out["generator"]
    state["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    state["optimizer"].step()
    state["scheduler"].step()
    if adversarial:
        out["discriminator"] = adversary.discriminator_step(out["target"], out["recon"])
    counts = state["counts"]
    counts += torch.bincount(out["indices"].flatten(), minlength=counts.numel())
    if tcfg.restart_every and (step + 1) % tcfg.restart_every == 0:
        state["restarted"] += _restart_dead_codes(model, counts, out["latents"])
        counts.zero_()
    names = ("loss", "l1", "l2", "codebook", "commitment", "generator", "discriminator")
    return {name: float(out[name].detach()) for name in names if name in out}


@torch.no_grad()
def evaluate_vqgan(
    model: VQGAN, dataset: Dataset, *, batch_size: int = 256, device: torch.device | None = None
) -> dict[str, float | int]:
    """Reconstruction quality and codebook use of ``model.reconstruct``.

    Args:
        model: the VQGAN to score.
        dataset: yields ``(image [3, H, W] in [0, 1], label)``.
        batch_size: images per forward pass.
        device: where to run; None = the model's device.

    Returns:
        ``psnr_db``: mean over images of ``10 log10(1 / MSE)`` on ``[0, 1]`` pixels; ``codebook_usage``: fraction
        of codes chosen at least once; ``perplexity``: ``exp`` of the entropy of the code histogram (the effective
        number of codes in use); ``images``: how many were scored.

    Raises:
        DADError: the data set is empty.
    """
    if len(dataset) == 0:
        raise DADError("evaluate_vqgan: the data set is empty")
    device = device or next(model.parameters()).device
    counts = torch.zeros(model.config["n_embed"], dtype=torch.long, device=device)
    psnrs = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = images.to(device)
        _, indices = model.quantize(model.encode(images * 2 - 1))
        counts += torch.bincount(indices.flatten(), minlength=counts.numel())
        mse = (model.reconstruct(images) - images).pow(2).flatten(1).mean(dim=1)
        psnrs.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
    probs = counts[counts > 0].double() / counts.sum()
    return {
        "psnr_db": float(torch.cat(psnrs).mean()),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(probs * probs.log()).sum())),
        "images": sum(len(p) for p in psnrs),
    }


def save_reconstruction_grid(model: VQGAN, dataset: Dataset, path: str | Path, *, count: int = 16) -> Path:
    """A PNG for a person: the first ``count`` images of ``dataset`` (top row) over their reconstructions (bottom),
    scaled up to at least 96 pixels per image so small images stay visible. Written atomically; returns ``path``."""
    from PIL import Image

    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    device = next(model.parameters()).device
    with torch.inference_mode():
        recon = model.reconstruct(images.to(device)).float().cpu().clamp(0, 1)
    rows = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)  # [3, 2H, count * W]
    pixels = (rows.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    scale = max(1, math.ceil(96 / images.shape[-1]))
    picture = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    return atomic_path(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def _fit(model: VQGAN, loader: DataLoader, tcfg: VQGANTrainConfig, device: torch.device, progress: bool) -> dict:
    """The epoch loop; returns the last step's losses, step count, images seen and codes restarted."""
    from dad_core.progress import progress_bar

    total_steps = tcfg.epochs * len(loader)
    optimizer, scheduler = _create_optimizer(model, tcfg, total_steps)
    state = {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "restarted": 0,
        "adversary": _Adversary(tcfg, total_steps, device) if tcfg.adversarial_weight > 0 else None,
        "counts": torch.zeros(model.config["n_embed"], dtype=torch.long, device=device),
    }
    step, seen, losses = 0, 0, {}
    with progress_bar(
        total=total_steps, desc="train-vqgan", unit="step", enabled=progress, primary=is_primary()
    ) as bar:
        for _ in range(tcfg.epochs):
            for images, _labels in loader:
                losses = _train_step(model, images.to(device), step, state, tcfg)
                step, seen = step + 1, seen + images.shape[0]
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{losses['loss']:.4f}", l1=f"{losses['l1']:.4f}", refresh=False)
    return {"losses": losses, "steps": step, "images": seen, "restarted_codes": state["restarted"]}


def train_vqgan(
    dataset: Dataset,
    cfg: VQGANConfig,
    output_path: str | Path,
    *,
    device: str | torch.device | None = None,
    val_dataset: Dataset | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a VQGAN of architecture ``cfg.config`` from scratch and save it in the published checkpoint layout.

    Args:
        dataset: yields ``(image [3, H, W] in [0, 1], label)``; H and W divisible by the downsampling factor.
        cfg: architecture name and training settings (``cfg.train``); ``cfg.checkpoint`` is not used here.
        output_path: checkpoint file to write (atomically), loadable with ``VQGAN.from_checkpoint``.
        device: e.g. ``"cpu"``/``"cuda:0"``; None = a GPU when present.
        val_dataset: held-out images for the reported PSNR and codebook use; None = score the training images.
        progress: show a progress bar (rank 0 only).

    Returns:
        A JSON-ready report: epochs, steps, images/s, final losses, ``val`` metrics (see :func:`evaluate_vqgan`),
        the split they were computed on, codes restarted, output path and its SHA-256.

    Raises:
        DADError: the training set is empty.
    """
    if len(dataset) == 0:
        raise DADError("train_vqgan: the training set is empty")
    tcfg = cfg.train
    set_seed(tcfg.seed)
    dev = torch.device(device) if device is not None else resolve_device()
    model = VQGAN.from_config(cfg.config).to(dev).train()
    loader = DataLoader(
        dataset,
        batch_size=min(tcfg.batch_size, len(dataset)),
        shuffle=True,
        drop_last=len(dataset) > tcfg.batch_size,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    start = time.perf_counter()
    fit = _fit(model, loader, tcfg, dev, progress)
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate_vqgan(model, val_dataset if val_dataset is not None else dataset, batch_size=256)
    path = model.save_checkpoint(output_path)
    grid = save_reconstruction_grid(
        model, val_dataset if val_dataset is not None else dataset, path.with_name(f"{path.stem}.reconstructions.png")
    )
    report = {
        "config": cfg.config,
        "epochs": tcfg.epochs,
        "steps": fit["steps"],
        "train_seconds": round(seconds, 2),
        "images_per_s": round(fit["images"] / max(seconds, 1e-9), 1),
        "final_losses": fit["losses"],
        "restarted_codes": fit["restarted_codes"],
        "eval_split": "val" if val_dataset is not None else "train",
        "val": metrics,
        "output": str(path),
        "sha256": sha256_file(path),
        "reconstructions": str(grid),
    }
    _logger.info(
        "VQGAN %s: PSNR %.2f dB, codebook usage %.1f%%, %.0f images/s -> %s",
        cfg.config,
        metrics["psnr_db"],
        100 * metrics["codebook_usage"],
        report["images_per_s"],
        path,
    )
    return report
