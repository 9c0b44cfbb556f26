"""Typed configuration: frozen dataclasses are the schema, ``params.yaml`` holds the defaults.

Every knob of every step lives here. ``load_config(path, overrides)`` reads a YAML file namespaced per
section (``data:``, ``teacher:``, ...), applies dotted ``key=value`` overrides and validates the result.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dad_core.errors import DADError
from dad_core.io import atomic_write_text

__all__ = [
    "AttackConfig",
    "CacheConfig",
    "ConfigError",
    "DADConfig",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LossConfig",
    "RegistryConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "VQGANConfig",
    "VQGANTrainConfig",
    "config_hash",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "redact_uri",
    "save_config",
    "split_userinfo",
]


class ConfigError(DADError):
    """A configuration key is unknown, has the wrong type, or is out of range. The message names the key."""


# PyYAML implements YAML 1.1, whose float pattern needs a dot: ``1e-3`` loads as the string "1e-3".
# Float fields accept such strings so that ``lr: 1e-3`` and ``--param train.lr=3e-4`` work.
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# How the VQGAN round trip runs under bf16 autocast (dad_core.vqgan.VQGAN.reconstruct):
#   fp32          everything in fp32: the reference's numbers (on GPUs up to TF32 convolutions)
#   bf16-decoder  encoder and code choice in fp32, the decoder (2/3 of the f8 FLOPs) in bf16: the same codes,
#                 pixels 1.4/255 apart on average (H200, f8 at 224 px); 29% faster generation when compiled
#   bf16          encoder and decoder in bf16, code distances still fp32: near-tie codes flip (2.8% there); 52%
#                 faster generation when compiled (docs/benchmarks.md has the measurements)
VQGAN_PRECISIONS = ("fp32", "bf16-decoder", "bf16")
RANDAUGMENT_BACKENDS = ("pil", "tensor")  # train.randaugment_backend (dad_core.randaugment has the differences)


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/digits"  # prepared image-folder dataset: classes.txt, train/, val/, suites/, manifest.json
    source: str = "digits"  # what prepare-data reads: digits (scikit-learn, embedded) | folder | dvc
    source_dir: str | None = None  # for source=folder/dvc: ImageNet-style tree (train/<class>/, val/<class>/)
    dvc_repo: str | None = None  # for source=dvc: git URL or path of the DVC repository
    dvc_rev: str | None = None  # for source=dvc: git revision (tag, branch, SHA)
    # for source=dvc: a folder (the datasets volume) keeping one checkout per resolved commit, which the steps read in
    # place and later runs of the same commit reuse; None: the checkout goes inside the prepared dataset
    dvc_checkouts: str | None = None
    image_size: int = 32  # training/eval resolution in pixels
    val_fraction: float = 0.25  # held-out share of the embedded digits (seeded, stratified split)
    seed: int = 0
    on_bad_image: str = "error"  # error: fail naming the file | skip: skip it and count it in the report
    num_workers: int = 0  # DataLoader workers
    suite_seed: int = 1234  # seed of the generated shifted suites (digits-C, renditions)
    suite_per_class: int = 20  # held-out images per class in the generated digits-C/-R suites (0 = all)

    def __post_init__(self) -> None:
        _one_of(self.source, "source", ("digits", "folder", "dvc"))
        _one_of(self.on_bad_image, "on_bad_image", ("error", "skip"))
        _check(8 <= self.image_size <= 1024, "image_size", f"must be in [8, 1024], got {self.image_size}")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        _check(self.suite_per_class >= 0, "suite_per_class", "must be >= 0 (0 = every held-out image)")


@dataclass(frozen=True)
class TeacherConfig:
    model_name: str = "dad-tiny-clip"  # open_clip model config name (dad-tiny-clip ships with dad_core)
    pretrained: str | None = None  # open_clip pretrained tag or weights file; None = random init (offline)
    checkpoint: str | None = None  # fine-tuned teacher loaded over the model (file written by finetune-teacher)
    templates: str = "simple"  # prompt set for the zero-shot head: openai (80) | simple (7) | plain (1)
    batch_size: int = 128  # teacher batch size when caching

    def __post_init__(self) -> None:
        _one_of(self.templates, "templates", ("openai", "simple", "plain"))
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 8
    lr: float = 1e-3  # AdamW learning rate (ImageNet-scale CLIP fine-tuning uses ~3e-5)
    weight_decay: float = 0.1
    batch_size: int = 64
    warmup_steps: int = 10
    wise_alpha: float = 1.0  # WiSE-FT mix: theta = (1 - alpha) * zero_shot + alpha * fine_tuned
    label_smoothing: float = 0.0
    augment: str = "broad"  # none | broad: finetune.broad_augment's shifts; the evaluation suites' stay held out
    eval_suites: bool = True  # score the fine-tuned teacher on the evaluation suites and report their top-1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.augment in ("none", "broad"), "augment", f"must be 'none' or 'broad', got {self.augment!r}")
        _check(0.0 <= self.wise_alpha <= 1.0, "wise_alpha", f"must be in [0, 1], got {self.wise_alpha}")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class VQGANTrainConfig:
    epochs: int = 3  # the embedded digits reach ~28 dB held-out PSNR with tiny-f4 in about a minute on 2 CPU cores
    lr: float = 2e-3
    batch_size: int = 16  # small batches: more updates per image, which is what a one-minute budget needs
    weight_decay: float = 1e-4  # AdamW; not applied to the codebook, norms and biases
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0
    beta: float = 0.25  # commitment loss weight (taming-transformers' VectorQuantizer default)
    restart_every: int = 20  # steps between dead-code restarts (codes unused in that window); 0 disables
    adversarial_weight: float = 0.0  # 0 disables the patch discriminator term
    adversarial_start: float = 0.5  # fraction of the steps trained before the discriminator term starts
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.beta >= 0, "beta", "must be >= 0")
        _check(self.restart_every >= 0, "restart_every", "must be >= 0")
        _check(self.adversarial_weight >= 0, "adversarial_weight", "must be >= 0")
        _check(0.0 <= self.adversarial_start < 1.0, "adversarial_start", "must be in [0, 1)")


@dataclass(frozen=True)
class VQGANConfig:
    # The architecture, also of the checkpoint: f8-16384 (the paper's, latent-diffusion vq-f8) | f16-1024 |
    # f16-16384 (taming ImageNet) | tiny-f4 (the embedded defaults, trained by train-vqgan)
    config: str = "tiny-f4"
    checkpoint: str | None = None  # taming/latent-diffusion .ckpt, state dict .pt/.pth, or .safetensors
    # DAD generation on a GPU (bf16 autocast): fp32 | bf16-decoder (same codes, faster) | bf16 (near-tie codes
    # may flip, fastest); see VQGAN_PRECISIONS above and docs/benchmarks.md. On a CPU the VQGAN always runs fp32.
    precision: str = "fp32"
    train: VQGANTrainConfig = field(default_factory=VQGANTrainConfig)

    def __post_init__(self) -> None:
        _one_of(self.precision, "precision", VQGAN_PRECISIONS)


@dataclass(frozen=True)
class AttackConfig:
    mode: str = "dad"  # dad: VQ -> PGD on teacher -> VQ | vq_only: VQ(VQ(x)) | random: random direction | none
    # Where dad/random perturb (dad_core.attack). pixel: the paper, an eps ball around VQ(x) in [0, 1] pixels, then a
    # second VQ round trip. latent: a ball around the VQGAN's continuous latent z0 = encode(VQ(x)), the teacher's
    # loss ascended through the decoder with a straight-through quantizer, the sample decode(quantize(z0 + delta))
    # with no second VQ, so the perturbation survives discretization. mode=dad + space=latent is "dad-latent".
    space: str = "pixel"
    norm: str = "l2"  # l2 | linf
    eps: float = 0.1  # radius in [0, 1] pixel units (L2 over the whole image, or per pixel for linf)
    # space=latent: radius relative to the latent itself, ||delta||_2 <= latent_eps * ||z0||_2 per sample (linf:
    # |delta| <= latent_eps * RMS(z0)); the step is step_size / eps times that radius (the same ratio as in pixels)
    latent_eps: float = 0.5
    step_size: float = 0.01  # 0.01 in the reference's offline generator, 0.1 in its online loop
    steps: int = 1
    random_start: float = 0.8  # probability of a random start on the eps sphere (one coin per batch)

    def __post_init__(self) -> None:
        _one_of(self.mode, "mode", ("dad", "vq_only", "random", "none"))
        _one_of(self.space, "space", ("pixel", "latent"))
        _one_of(self.norm, "norm", ("l2", "linf"))
        _check(0.0 < self.eps <= 1000.0, "eps", f"must be in (0, 1000], got {self.eps}")
        _check(0.0 < self.latent_eps <= 1000.0, "latent_eps", f"must be in (0, 1000], got {self.latent_eps}")
        _check(self.step_size > 0, "step_size", "must be > 0")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(0.0 <= self.random_start <= 1.0, "random_start", "must be a probability in [0, 1]")


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache/teacher"  # where cache-teacher writes shards and manifest.json
    views: int = 2  # R augmented views per image (and per DAD sample) for teacher_mode=cached; 0 = none
    topk: int = 10  # soft labels stored as the teacher's top-k probabilities (fp16)
    shard_size: int = 256  # images per shard; a killed run loses at most the shard in flight
    batch_size: int = 128
    seed: int = 0
    compile: bool = False  # torch.compile the teacher and the VQGAN (GPU; pays off on long runs)
    # When training checks the shards' sha256: lazy: each shard when a process first opens it (start-up only stats
    # the files) | full: rank 0 hashes the whole cache before step one (ImageNet: 386 GB) | none
    verify: str = "lazy"

    def __post_init__(self) -> None:
        _one_of(self.verify, "verify", ("lazy", "full", "none"))
        _check(self.views >= 0, "views", "must be >= 0")
        _check(self.topk >= 1, "topk", "must be >= 1")
        _check(self.shard_size >= 1, "shard_size", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class LossConfig:
    variant: str = "A"  # A: CE + T^2/2 KL(clean) + T^2/2 KL(DAD) | C: joint batch, 0.75 CE + 4 KL (DESIGN 3.4)
    temperature: float = 4.0
    # Variant A weights of the T^2-scaled KL terms. kd_weight is the default of both; kd_clean_weight (KL on the
    # clean images) and kd_adv_weight (KL on the DAD samples) override it per term (null = kd_weight). kd_weight
    # stays so that existing params files and `-p loss.kd_weight=0` (both 0: plain CE, no teacher, no cache) work.
    # A DAD-sample weight of 0 also keeps the DAD samples out of the student's forward pass (and BatchNorm).
    kd_weight: float = 0.5
    kd_clean_weight: float | None = None
    kd_adv_weight: float | None = None

    def __post_init__(self) -> None:
        _one_of(self.variant, "variant", ("A", "C"))
        _check(self.temperature > 0, "temperature", "must be > 0")
        for key in ("kd_weight", "kd_clean_weight", "kd_adv_weight"):
            value = getattr(self, key)
            _check(value is None or 0 <= value < float("inf"), key, f"must be a finite number >= 0, got {value}")
        _check(
            self.variant == "A" or (self.kd_clean_weight is None and self.kd_adv_weight is None),
            "kd_clean_weight" if self.kd_clean_weight is not None else "kd_adv_weight",
            "applies to variant A only (variant C weighs its terms 0.75 CE + 0.25 T^2 KL)",
        )

    @property
    def kd_weights(self) -> tuple[float, float]:
        """Variant A's ``(clean, DAD)`` KL weights, ``kd_weight`` standing in for an unset one."""
        clean = self.kd_weight if self.kd_clean_weight is None else self.kd_clean_weight
        adv = self.kd_weight if self.kd_adv_weight is None else self.kd_adv_weight
        return clean, adv

    @property
    def uses_teacher(self) -> bool:
        """False for plain CE (variant A, both KL weights 0): no teacher runs and no teacher cache is read."""
        return self.variant == "C" or any(w > 0 for w in self.kd_weights)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "resnet10t"  # any timm model name
    pretrained: bool = False
    teacher_mode: str = "cached"  # cached: replay stored views + soft labels | online: run the teacher each step
    epochs: int = 10
    batch_size: int = 32  # per process, clean images (the DAD batch has the same size)
    optimizer: str = "adamw"  # any timm optimizer name
    lr: float = 2e-3
    weight_decay: float = 0.05
    sched: str = "cosine"  # any timm scheduler name
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    crop_scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop scale range (also of the cached views)
    hflip: float = 0.0  # flip probability (0 for digits, whose mirror images are other shapes; 0.5 for photos)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off
    label_smoothing: float = 0.1
    randaugment: str = ""  # timm auto-augment string, e.g. rand-m9-mstd0.5-inc1 ("" = off)
    # pil: timm's PIL ops, per image on the CPU | tensor: the same policy on tensors (dad_core.randaugment), which
    # train.replay_on_device replays batched on the training device; the two draw other ops for one seed
    randaugment_backend: str = "pil"
    reprob: float = 0.0  # random erasing probability (timm pixel mode, one box; in the training step, student only)
    drop_path: float = 0.0
    ema_decay: float = 0.0  # 0 disables EMA
    clip_grad: float | None = None
    grad_accum: int = 1
    amp: str = "auto"  # auto: bf16 on GPU, off on CPU | bf16 | off
    channels_last: bool = True  # applied on GPU only
    compile: bool = False
    checkpoint_every: int = 0  # steps between checkpoints (0 = each epoch end only)
    seed: int = 0
    num_workers: int = 0
    # Make the views (crop, resize, flip, RandAugment) batched on the training device instead of in the loader workers:
    # the cached views, or the fresh ones of online and plain-CE runs; the loader then only copies uint8 images. With
    # RandAugment only for randaugment_backend: tensor (timm's PIL ops stay on the CPU).
    replay_on_device: bool = False
    output_dir: str = "runs/train"

    def __post_init__(self) -> None:
        _one_of(self.teacher_mode, "teacher_mode", ("cached", "online"))
        _one_of(self.amp, "amp", ("auto", "bf16", "off"))
        _one_of(self.randaugment_backend, "randaugment_backend", RANDAUGMENT_BACKENDS)
        if self.randaugment and self.randaugment_backend == "tensor":
            from dad_core.randaugment import parse_randaugment  # torch only when this backend is chosen

            try:
                parse_randaugment(self.randaugment)
            except ValueError as err:
                raise ConfigError(f"randaugment: {err}") from None
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        for key in ("mixup", "cutmix", "reprob", "drop_path", "label_smoothing"):
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0 or (key in ("mixup", "cutmix") and value >= 0), key, f"out of range: {value}")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            f"must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}",
        )
        _check(0.0 <= self.hflip <= 1.0, "hflip", "must be a probability in [0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    suites: tuple[str, ...] = ("auto",)  # suite names, or auto: every suite found under root
    root: str | None = None  # where the suites live; None = <data.root>/suites
    batch_size: int = 256
    output_dir: str = "runs/eval"
    crop_pct: float | None = None  # test-time center-crop fraction; None = the student's pretrained_cfg (else 1.0)
    interpolation: str | None = None  # resize filter (bicubic, bilinear, ...); None = the student's pretrained_cfg

    def __post_init__(self) -> None:
        _check(len(self.suites) >= 1, "suites", "must name at least one suite (or auto)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        crop_ok = self.crop_pct is None or 0.0 < self.crop_pct <= 1.0
        _check(crop_ok, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        if self.interpolation is not None:
            _one_of(self.interpolation, "interpolation", ("bicubic", "bilinear", "nearest", "lanczos", "box"))


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None = tracking off unless MLFLOW_TRACKING_URI is set
    experiment: str = "dad"
    timeout_s: float = 10.0  # how long to wait for a tracking server at start before failing
    system_metrics: bool = True  # log CPU/memory/disk (and GPU with nvidia-ml-py) utilization; needs psutil
    artifact_location: str | None = None  # for a new experiment; None = the server's, or mlartifacts/ by the sqlite db
    pipeline_run_id: str = ""  # set by the pipelines: the step's run becomes a child of that pipeline run's parent run

    def redacted(self) -> TrackingConfig:
        """This config with any ``user:password@`` in its URIs shown as ``***@``: what config.yaml and params hold."""
        hide = {k: redact_uri(v) for k in ("uri", "artifact_location") if (v := getattr(self, k))}
        return dataclasses.replace(self, **hide) if hide else self


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "dad-student"
    metric: str = "ood_mean_top1"  # promotion: the challenger must beat the champion on this...
    margin: float = 0.0  # ...by at least this much
    clean_metric: str = "clean_top1"
    clean_tolerance: float = 1.0  # ...and may not lose more than this on the clean metric (points)


@dataclass(frozen=True)
class DADConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation (str, int, float, bool, X | None, tuple[...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        _check(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        args = typing.get_args(annotation)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        _check(len(items) == len(value), key, f"expected {len(items)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, items, strict=True)))
    if annotation is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
    elif annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value)
        _check(isinstance(value, int | float) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    elif annotation is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys in this section: {sorted(names)})")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a plain nested dict (tuples as lists) that YAML and JSON can hold."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["train.lr=0.1", "attack.norm=linf"]`` into a nested dict; values are parsed as YAML scalars.

    Raises:
        ConfigError: an item is not ``key=value``.
    """
    nested: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = _load_yaml(raw, f"override {item!r}") if raw.strip() else None
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML says keys are unique; PyYAML
    silently keeps the last one, so ``lr: 0.1`` followed by ``lr: 0.2`` would hide a mistake)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely; any syntax error or duplicate key is a one-line :class:`ConfigError` naming ``where``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, text: str | None = None
) -> DADConfig:
    """Load a :class:`DADConfig` from YAML (file or ``text``) plus dotted ``key=value`` overrides.

    Keys not in the file keep the dataclass defaults.

    Args:
        path: YAML file namespaced per section; None for the built-in defaults.
        overrides: dotted overrides applied after the file, e.g. ``["train.epochs=2"]``.
        text: YAML text used instead of ``path``.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value (the message names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    values: dict[str, Any] = {}
    if text is None and path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
    if text:
        loaded = _load_yaml(text, f"config {path}" if path is not None else "config")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("config: the YAML top level must be a mapping of sections")
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides))
    return _build(DADConfig, values, "")


def save_config(cfg: DADConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); :func:`load_config` reads it back equal.

    Credentials in the tracking URIs are the exception: they are written as ``***`` (:meth:`TrackingConfig.redacted`),
    since a run folder is shared and versioned and a password must not be.
    """
    cfg = dataclasses.replace(cfg, tracking=cfg.tracking.redacted())
    return atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# The userinfo runs from // to the LAST @ before the first /: RFC 3986 allows @ in it only percent-encoded, but a raw
# one (http://u:p@ss@host) must not leave half a password behind. A raw / in a password cannot be told from a path.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/]*)@")


def split_userinfo(uri: str) -> tuple[str, str | None]:
    """Split ``scheme://userinfo@host/...`` into the URI without its userinfo and the raw userinfo.

    Returns:
        ``(uri without "userinfo@", userinfo)``; ``(uri, None)`` when it has none.
    """
    match = _USERINFO.match(uri)
    if match is None:
        return uri, None
    return match.group(1) + uri[match.end() :], match.group(2)


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo (``user:password``, ``token``) shown as ``***``: ``http://***@host:5000``."""
    clean, userinfo = split_userinfo(uri)
    return clean.replace("://", "://***@", 1) if userinfo else uri


def config_hash(section: Any) -> str:
    """A short, stable hash of a config (or a section of one), for manifests and lineage tags."""
    blob = json.dumps(config_to_dict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
