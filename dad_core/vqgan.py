"""The VQGAN discretizer of DAD (DESIGN 3.2), checkpoint-compatible with taming-transformers and latent-diffusion.

The network is built from diffusers' VQGAN blocks (``diffusers.models.autoencoders.vae.Encoder``/``Decoder``, the
ones ``diffusers.VQModel`` is made of), which express taming's ``Encoder``/``Decoder`` exactly: the same ResnetBlocks
with GroupNorm(32, eps=1e-6) and swish, single-head attention scaled by ``1/sqrt(C)``, the asymmetric ``(0, 1, 0, 1)``
pad before each stride-2 downsampling conv, nearest x2 upsampling followed by a 3x3 conv, and the same parameter
count (76,073,859 for f16-16384). Only the parameter names differ, and attention projections are ``nn.Linear`` in
diffusers but 1x1 convs in taming. :func:`to_taming_state_dict` and :func:`from_taming_state_dict` translate, so
published checkpoints load without edits and :meth:`VQGAN.save_checkpoint` writes the published layout.

Images enter and leave :meth:`VQGAN.reconstruct` in ``[0, 1]`` (STYLE B12); the network itself works in ``[-1, 1]``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dad_core.config import VQGAN_PRECISIONS, ConfigError
from dad_core.errors import DADError
from dad_core.io import atomic_path, save_torch, sha256_file

__all__ = [
    "VQGAN",
    "VQGAN_CONFIGS",
    "VQGAN_PRECISIONS",
    "CheckpointError",
    "from_taming_state_dict",
    "nearest_code_indices",
    "resolve_vqgan_config",
    "to_taming_state_dict",
]

_logger = logging.getLogger(__name__)

# Architectures in taming's ``ddconfig`` vocabulary plus the codebook size (n_embed) and code dimension (embed_dim).
# One architecture per line reads better than one key per line, hence the formatter pause.
_IO = dict(in_channels=3, out_ch=3, double_z=False, dropout=0.0)
# fmt: off
VQGAN_CONFIGS: dict[str, dict[str, Any]] = {
    # latent-diffusion vq-f8 / "VQGAN OpenImages (f=8)": the reference's discretizer (dad_method.md 1.3)
    "f8-16384": dict(ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], z_channels=4,
                     embed_dim=4, n_embed=16384, resolution=256, **_IO),
    # taming-transformers ImageNet VQGANs
    "f16-1024": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                     embed_dim=256, n_embed=1024, resolution=256, **_IO),
    "f16-16384": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                      embed_dim=256, n_embed=16384, resolution=256, **_IO),
    # embedded defaults (DESIGN 1b): 32x32 digits -> an 8x8 grid of codes; trains in about a minute on 2 CPU cores
    "tiny-f4": dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                    embed_dim=8, n_embed=256, resolution=32, **_IO),
}
# fmt: on
_DEFAULT_CHECKPOINT_CONFIG = "f8-16384"
_OPTIONAL_KEYS = {"in_channels": 3, "out_ch": 3, "double_z": False, "dropout": 0.0, "resamp_with_conv": True}
# ``resolution`` only places attention: taming compares each level's nominal size with ``attn_resolutions``.
_REQUIRED_KEYS = "ch ch_mult num_res_blocks attn_resolutions z_channels embed_dim n_embed resolution".split()
# Lightning checkpoints also hold the training loss (discriminator, LPIPS) and, in latent-diffusion, EMA weights.
_IGNORED_PREFIXES = ("loss.", "model_ema.")
_NEAREST_CODE_BUDGET = 1 << 24  # distance-matrix elements per chunk (64 MiB in fp32)


class CheckpointError(DADError):
    """A VQGAN checkpoint cannot be read or does not match the architecture; the message names the file and keys."""


def resolve_vqgan_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of a named (:data:`VQGAN_CONFIGS`) or explicit architecture dict.

    Raises:
        ConfigError: unknown name, missing or unknown key, or an architecture the diffusers blocks cannot express.
    """
    if isinstance(config, str):
        if config not in VQGAN_CONFIGS:
            raise ConfigError(f"vqgan.config: unknown VQGAN {config!r}; named configs are {sorted(VQGAN_CONFIGS)}")
        return copy.deepcopy(VQGAN_CONFIGS[config])
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    unknown = sorted(set(config) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise ConfigError(f"vqgan config: missing keys {missing}, unknown keys {unknown}")
    resolved = {**_OPTIONAL_KEYS, **copy.deepcopy(dict(config))}
    resolved.pop("resamp_with_conv")
    checks = {
        "ch_mult": resolved["ch_mult"][0] == 1,  # taming's conv_in has ch channels, diffusers' ch * ch_mult[0]
        "double_z": resolved["double_z"] is False,
        "dropout": resolved["dropout"] == 0.0,
        "resamp_with_conv": config.get("resamp_with_conv", True) is True,
        "ch": all((resolved["ch"] * m) % 32 == 0 for m in resolved["ch_mult"]),  # GroupNorm(32 groups)
        "num_res_blocks": resolved["num_res_blocks"] >= 1,
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(
            f"vqgan config: unsupported values for {bad} (need ch_mult[0] == 1, double_z false, "
            f"dropout 0, resamp_with_conv true, ch * mult divisible by 32, num_res_blocks >= 1)"
        )
    return resolved


def _level_resolutions(config: dict[str, Any]) -> list[int]:
    """Feature-map size at each encoder level, as taming computes it from ``resolution`` (not the input size)."""
    return [config["resolution"] // 2**level for level in range(len(config["ch_mult"]))]


def _create_network(config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    # Lazy import: diffusers takes seconds to import and only this constructor needs it.
    from diffusers.models.autoencoders.vae import Decoder, Encoder

    attn = [res in config["attn_resolutions"] for res in _level_resolutions(config)]
    channels = tuple(config["ch"] * m for m in config["ch_mult"])
    encoder = Encoder(
        in_channels=config["in_channels"],
        out_channels=config["z_channels"],
        block_out_channels=channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        layers_per_block=config["num_res_blocks"],
        norm_num_groups=32,
        act_fn="silu",
        double_z=False,
    )
    decoder = Decoder(
        in_channels=config["z_channels"],
        out_channels=config["out_ch"],
        block_out_channels=channels,
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        layers_per_block=config["num_res_blocks"],
        norm_num_groups=32,
        act_fn="silu",
        norm_type="group",
    )
    return encoder, decoder


# diffusers -> taming names. Decoder levels are reversed: diffusers' up_blocks.0 is the lowest resolution, taming's
# up.0 the full resolution (taming prepends each level while building from the bottom up).
_LEAF_RENAMES = (
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".proj_out."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^codebook\.", "quantize.embedding."),
)
_DECODER_LEVEL = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.")
_DECODER_PART = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}


def _taming_key(key: str, num_levels: int) -> str:
    for pattern, repl in _LEAF_RENAMES:
        key = re.sub(pattern, repl, key)
    return _DECODER_LEVEL.sub(
        lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.{_DECODER_PART[m.group(2)]}.", key
    )


def _is_attention_projection(taming_key: str) -> bool:
    return re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", taming_key) is not None


def to_taming_state_dict(state_dict: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Rename a :class:`VQGAN` (diffusers-layout) state dict to taming's names; attention weights become 1x1 convs.

    Args:
        state_dict: ``VQGAN.state_dict()``.
        num_levels: ``len(ch_mult)``, needed to reverse the decoder's level order.

    Returns:
        A new dict in the taming-transformers / latent-diffusion key layout.
    """
    out = {}
    for key, value in state_dict.items():
        name = _taming_key(key, num_levels)
        out[name] = value[:, :, None, None] if _is_attention_projection(name) and value.dim() == 2 else value
    return out


def from_taming_state_dict(
    taming_state: dict[str, Tensor], model_state: dict[str, Tensor], num_levels: int, *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Translate a taming-layout state dict to the layout of ``model_state`` (a ``VQGAN.state_dict()``).

    Args:
        taming_state: weights under taming's names; training-loss and EMA entries (``loss.*``, ``model_ema.*``)
            are dropped.
        model_state: the target model's state dict, which fixes the expected names and shapes.
        num_levels: ``len(ch_mult)``.
        source: what to call the weights in error messages (the file name).

    Returns:
        A state dict for ``VQGAN.load_state_dict``; attention projections reshaped from 1x1 convs to linears.

    Raises:
        CheckpointError: a model key is missing or unexpected (the first 20 are listed), or a shape differs.
    """
    names = {_taming_key(key, num_levels): key for key in model_state}
    given = {k: v for k, v in taming_state.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing, unexpected = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the VQGAN architecture: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]} (is the config right?)"
        )
    out = {}
    for taming_name, key in names.items():
        value, target = given[taming_name], model_state[key]
        if _is_attention_projection(taming_name) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if value.shape != target.shape:
            raise CheckpointError(
                f"{source}: {taming_name} has shape {tuple(value.shape)}, the VQGAN config needs {tuple(target.shape)}"
            )
        out[key] = value
    return out


def nearest_code_indices(z: Tensor, codebook: Tensor, budget: int = _NEAREST_CODE_BUDGET) -> Tensor:
    """Index of the nearest code (squared L2) for each row of ``z``, in fp32, without a full distance matrix.

    ``||z||^2 + ||e||^2 - 2 z.e`` is evaluated in the same order as taming's ``VectorQuantizer2``, over chunks of
    rows sized so a chunk's distance matrix holds at most ``budget`` elements (f8-16384 at 224 px would otherwise
    need 3 GiB for a batch of 64). fp32 even under autocast: 16,384 codes of dimension 4 are dense, near-ties are
    common, and bf16 distances would flip the argmin and make discretization depend on the precision.

    Fused: the code norms are computed once per call and each chunk's distances are one ``addmm`` (the matmul adds
    ``-2 z.e`` onto ``||z||^2 + ||e||^2`` in its epilogue) instead of a matmul and two full-size elementwise
    passes. Scaling by -2 is exact in binary floating point, so the distances, and the codes, are bit-identical to
    taming's three-step formula (1.3-1.5x faster on a CPU core for f8-16384, docs/benchmarks.md). Dropping ``||z||^2``,
    which cannot change the exact argmin, would be faster still but rounds differently on near-ties.

    Args:
        z: ``[N, D]`` latent vectors.
        codebook: ``[K, D]`` code vectors.
        budget: maximum number of distance elements computed at once.

    Returns:
        ``[N]`` int64 code indices.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        code_sq = codebook.pow(2).sum(dim=1)
        rows = max(1, budget // codebook.shape[0])
        chunks = []
        for part in z.split(rows):
            dist = torch.addmm(part.pow(2).sum(dim=1, keepdim=True) + code_sq, part, codebook.t(), alpha=-2)
            chunks.append(dist.argmin(dim=1))
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long, device=z.device)


class VQGAN(nn.Module):
    """Encoder -> 1x1 quant_conv -> nearest code -> 1x1 post_quant_conv -> decoder (taming's VQModel, inference).

    Attributes:
        config: the resolved architecture dict (taming ``ddconfig`` keys plus ``n_embed``/``embed_dim``).
        precision: one of :data:`VQGAN_PRECISIONS`, how :meth:`reconstruct` runs inside bf16 autocast.
        config_name: the named config this architecture is (also when given as a dict), or ``None``.
        checkpoint_path: the file it was loaded from, or ``None``.
        checkpoint_hash: SHA-256 of that file, or ``None``; for manifests.
    """

    def __init__(self, config: str | dict[str, Any] = "tiny-f4", *, precision: str = "fp32") -> None:
        super().__init__()
        self.config = resolve_vqgan_config(config)
        self.precision = precision
        named = (name for name, arch in VQGAN_CONFIGS.items() if arch == self.config)
        self.config_name = config if isinstance(config, str) else next(named, None)
        self.checkpoint_path: str | None = None
        self.checkpoint_hash: str | None = None
        cfg = self.config
        self.encoder, self.decoder = _create_network(cfg)
        self.quant_conv = nn.Conv2d(cfg["z_channels"], cfg["embed_dim"], 1)
        self.codebook = nn.Embedding(cfg["n_embed"], cfg["embed_dim"])  # quantize.embedding in taming
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg["n_embed"], 1.0 / cfg["n_embed"])  # taming's init
        self.post_quant_conv = nn.Conv2d(cfg["embed_dim"], cfg["z_channels"], 1)

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in VQGAN_PRECISIONS:
            raise ConfigError(f"vqgan.precision: must be one of {', '.join(VQGAN_PRECISIONS)}, got {value!r}")
        self._precision = value

    @classmethod
    def from_config(cls, config: str | dict[str, Any], *, precision: str = "fp32") -> VQGAN:
        """A randomly initialized VQGAN of a named (:data:`VQGAN_CONFIGS`) or explicit architecture."""
        return cls(config, precision=precision)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | dict[str, Any] | None = None,
        *,
        precision: str = "fp32",
    ) -> VQGAN:
        """Load a taming / latent-diffusion / our own checkpoint.

        Accepts a Lightning ``.ckpt`` (a dict with ``state_dict``; ``loss.*`` discriminator/LPIPS keys ignored), a
        plain state dict (``.pt``/``.pth``/``.bin``), or ``.safetensors``, all in taming's key layout.

        Args:
            path: the checkpoint file.
            config: the architecture; None = the ``dad_config`` stored in the file by :meth:`save_checkpoint`,
                else ``"f8-16384"`` (the reference's VQGAN).
            precision: see :attr:`precision`.

        Returns:
            The model in eval mode on the CPU, with ``checkpoint_path``/``checkpoint_hash`` set.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            CheckpointError: the file cannot be read, or its keys or shapes do not match the architecture.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
        state, stored_config = _read_checkpoint(path)
        model = cls(config if config is not None else stored_config or _DEFAULT_CHECKPOINT_CONFIG, precision=precision)
        model.load_state_dict(
            from_taming_state_dict(
                state,
                model.state_dict(),
                len(model.config["ch_mult"]),
                source=f"{path} (read as VQGAN config {model.config_name or model.config})",
            )
        )
        model.checkpoint_path, model.checkpoint_hash = str(path), sha256_file(path)
        _logger.info("loaded VQGAN %s from %s", model.config_name or "custom", path)
        return model.eval()

    def taming_state_dict(self) -> dict[str, Tensor]:
        """The weights under taming-transformers' names (CPU, contiguous), as published checkpoints store them."""
        state = to_taming_state_dict(self.state_dict(), len(self.config["ch_mult"]))
        return {key: value.detach().cpu().contiguous() for key, value in state.items()}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the published layout atomically: ``{"state_dict": taming keys, "dad_config": architecture}``.

        A ``.safetensors`` path stores the same tensors with the architecture as JSON metadata.

        Returns:
            ``path``.
        """
        path = Path(path)
        state = self.taming_state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"dad_config": json.dumps(self.config)}
            return atomic_path(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        return save_torch({"state_dict": state, "dad_config": self.config}, path)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def encode(self, x: Tensor) -> Tensor:
        """Pre-quantization latents.

        Args:
            x: ``[B, C, H, W]`` images in ``[-1, 1]``; H and W divisible by :attr:`downsample_factor`.

        Returns:
            ``[B, embed_dim, H/f, W/f]``, after ``quant_conv``.
        """
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Replace each latent vector by its nearest code (no straight-through term; see ``vqgan_train``).

        Args:
            z: ``[B, D, h, w]`` latents from :meth:`encode`.

        Returns:
            ``(codes, indices)``: ``[B, D, h, w]`` code vectors (differentiable w.r.t. the codebook) and ``[B, h, w]``
            int64 code indices.
        """
        b, d, h, w = z.shape
        indices = nearest_code_indices(z.permute(0, 2, 3, 1).reshape(-1, d), self.codebook.weight)
        codes = self.codebook(indices).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return codes, indices.view(b, h, w)

    def decode(self, codes: Tensor) -> Tensor:
        """Images from code vectors.

        Args:
            codes: ``[B, embed_dim, h, w]``.

        Returns:
            ``[B, out_ch, h*f, w*f]``, roughly in ``[-1, 1]`` (not clamped).
        """
        return self.decoder(self.post_quant_conv(codes))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images from ``[B, h, w]`` code indices (see :meth:`decode`)."""
        return self.decode(self.codebook(indices).permute(0, 3, 1, 2))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """The discretizer: ``x -> 2x-1 -> encode -> nearest code -> decode -> clamp(-1, 1) -> (x+1)/2`` (DESIGN 3.2).

        Outside a bf16 autocast region it runs in the model's dtype. Inside one, :attr:`precision` decides:
        ``fp32`` (the default) switches autocast off, because the output is a choice among codes and bf16 latents
        flip near-tie choices (on an H200, f8-16384 at 224 px under bf16 autocast moved pixels by up to 0.14 versus
        fp32); ``bf16-decoder`` keeps the encoder and the code choice in fp32 and runs only the decoder in bf16,
        which cannot change a code; ``bf16`` runs the encoder too in bf16 (codes may differ on near-ties). The
        codebook distances are fp32 in every mode (:func:`nearest_code_indices`).

        Every operation is per sample (GroupNorm, attention within an image), so a batch gives the same result as
        its images one by one, up to the rounding of the convolution algorithm picked for each batch size, which
        can flip a rare near-tie code on GPUs. PyTorch's default TF32 convolutions (Ampere and later) changed 2.5%
        of f8 code choices versus the CPU; with ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` set at
        program start they all matched (3.6x slower). No gradient flows through it.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``[B, 3, H, W]`` in ``[0, 1]``, in the dtype of ``images``.
        """
        device_type = images.device.type
        in_bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        bf16_encoder = in_bf16 and self.precision == "bf16"
        bf16_decoder = in_bf16 and self.precision != "fp32"
        dtype = next(self.parameters()).dtype
        with torch.autocast(device_type, enabled=False):
            x = images.to(dtype) * 2 - 1
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_encoder):
                z = self.encode(x)
            codes, _ = self.quantize(z.to(dtype))
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_decoder):
                out = self.decode(codes)
            return ((out.to(dtype).clamp(-1, 1) + 1) / 2).to(images.dtype)

    @torch.no_grad()
    def code_indices(self, images: Tensor) -> Tensor:
        """The code indices :meth:`reconstruct` decodes ``images`` from (same precision rules), e.g. to count how
        many codes an attack changed; it costs an encode, not a decode.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``[B, H/f, W/f]`` int64 code indices.
        """
        device_type = images.device.type
        in_bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        dtype = next(self.parameters()).dtype
        with torch.autocast(device_type, enabled=False):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=in_bf16 and self.precision == "bf16"):
                z = self.encode(images.to(dtype) * 2 - 1)
            return self.quantize(z.to(dtype))[1]

    def forward(self, images: Tensor) -> Tensor:
        """Same as :meth:`reconstruct`, so a VQGAN can be passed wherever a discretizer callable is expected."""
        return self.reconstruct(images)


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Return ``(taming-layout state dict, stored architecture or None)`` from any supported file format.

    Pickled files go through the product's safe loader with placeholders: the classes a Lightning checkpoint names
    besides its weights (hyper-parameters, callbacks) load as inert stand-ins, so published checkpoints load without
    trusting their pickles, and nothing in them runs.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = (handle.metadata() or {}).get("dad_config")
            return load_file(str(path)), json.loads(stored) if stored else None
        except (SafetensorError, OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    from dad_core.serialization import WeightsFileError, load_torch_file

    try:
        obj = load_torch_file(path, placeholders=True)
    except WeightsFileError as err:
        raise CheckpointError(f"VQGAN checkpoint {err}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj.get("dad_config")
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointError(f"{path}: expected a state dict or a dict with 'state_dict', got {type(obj).__name__}")
