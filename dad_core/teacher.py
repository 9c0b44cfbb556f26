"""The CLIP teacher: an open_clip image tower with a zero-shot head, frozen, taking images in [0, 1].

logits = logit_scale * cos(image features, class embeddings), where the class embeddings come from
open_clip's own ``build_zero_shot_classifier`` over class names x prompt templates (DESIGN §3.1). The
teacher normalizes its own input with the model's mean/std: the reference code fed raw [0, 1] pixels to
CLIP (dad_method.md §1.7, item 6), which we do not copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dad_core.errors import DADError

__all__ = [
    "CLIPClassifier",
    "TeacherCheckpointError",
    "TimmTeacher",
    "create_clip_classifier",
    "FrozenTeacher",
    "create_clip_teacher",
    "freeze",
    "get_templates",
    "save_teacher_checkpoint",
]

_logger = logging.getLogger(__name__)
_CHECKPOINT_FORMAT = "dad-clip-classifier"
_TINY_CONFIG = Path(__file__).parent / "resources" / "dad-tiny-clip.json"


class TeacherCheckpointError(DADError):
    """A teacher checkpoint cannot be used: wrong format, missing keys, or a class list that does not match."""


def _register_tiny_config() -> None:
    import open_clip

    if "dad-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIG)


def get_templates(name: str) -> tuple:
    """Prompt templates shipped in open_clip: ``openai`` (80), ``simple`` (7) or ``plain`` (1)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {
        "openai": OPENAI_IMAGENET_TEMPLATES,
        "simple": SIMPLE_IMAGENET_TEMPLATES,
        "plain": (lambda c: f"a photo of a {c}.",),
    }
    if name not in sets:
        raise ValueError(f"unknown template set {name!r}; choose one of {sorted(sets)}")
    return tuple(sets[name])


class FrozenTeacher(nn.Module):
    """Wraps a teacher: no grads, and ``train()`` keeps it in eval mode (STYLE rule 11). Never put it in DDP."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "classnames", ()))

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def freeze(module: nn.Module) -> FrozenTeacher:
    """Return ``module`` frozen for use as a teacher."""
    return FrozenTeacher(module).eval()


class CLIPClassifier(nn.Module):
    """CLIP image tower + cosine head. Input ``[B, 3, H, W]`` in [0, 1]; output ``[B, C]`` logits."""

    def __init__(
        self,
        visual: nn.Module,
        head: Tensor,
        logit_scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        classnames: Sequence[str],
        model_name: str = "",
    ) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Parameter(head.detach().clone())  # [C, D], rows L2-normalized
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_size = int(image_size)
        self.classnames = tuple(classnames)
        self.model_name = model_name

    @property
    def num_classes(self) -> int:
        return self.head.shape[0]

    def normalize_input(self, images: Tensor) -> Tensor:
        """[0, 1] pixels at any size -> the tower's resolution, CLIP mean/std normalized."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        features = F.normalize(self.visual(self.normalize_input(images)), dim=-1)
        head = F.normalize(self.head, dim=-1)
        return self.logit_scale * features @ head.to(features.dtype).t()


class TimmTeacher(nn.Module):
    """A timm classifier (e.g. ``vit_large_patch14_clip_224.openai_ft_in12k_in1k``) taking [0, 1] images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.pretrained_cfg
        self.image_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", antialias=True)
        return self.model((images - self.mean) / self.std)


def _load_file(path: str) -> Any:
    """A teacher file through the product's safe loader (local path, ``file://``, ``s3://``, ...): never unpickles
    code; a pickle that needs more than tensors and plain data is refused with how to convert it."""
    from dad_core.serialization import WeightsFileError, load_torch_file

    if "://" not in path and not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    try:
        return load_torch_file(path)
    except WeightsFileError as err:
        raise TeacherCheckpointError(f"teacher checkpoint {err}") from None


def create_clip_classifier(
    model_name: str = "dad-tiny-clip",
    pretrained: str | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence | str | None = None,
    *,
    device: str | torch.device | None = None,
    clip_state_dict: dict[str, Tensor] | None = None,
    build_head: bool = True,
) -> CLIPClassifier:
    """Build a trainable CLIP classifier whose head is the zero-shot head (used by fine-tuning).

    Args:
        model_name: open_clip model config name.
        pretrained: open_clip pretrained tag or local weights file; None = random weights (works offline).
        classnames: class names for the prompts; default the 1000 ImageNet names shipped in open_clip.
        templates: prompt templates or the name of a set (``openai``, ``simple``, ``plain``); default ``openai``.
        device: where to build the head.
        clip_state_dict: full open_clip weights to load before building the head.
        build_head: False leaves the head empty, for a caller that loads a saved head over it (building it runs
            the text tower over classes x templates: minutes for ViT-L with 1000 classes x 80 templates).

    Returns:
        The classifier, in train mode, all parameters trainable.
    """
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    _register_tiny_config()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    if clip_state_dict is not None:
        missing, unexpected = model.load_state_dict(clip_state_dict, strict=False)
        if missing or unexpected:
            raise TeacherCheckpointError(
                f"open_clip weights do not fit {model_name}: missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
    classnames = tuple(classnames or IMAGENET_CLASSNAMES)
    templates = get_templates(templates or "openai") if isinstance(templates, str | None) else tuple(templates)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    if build_head:
        head = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device or "cpu")
    else:
        head = torch.zeros(model.visual.output_dim, len(classnames))
    visual_cfg = model.visual
    mean = getattr(visual_cfg, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual_cfg, "image_std", None) or open_clip.OPENAI_DATASET_STD
    size = visual_cfg.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    classifier = CLIPClassifier(
        model.visual, head.t().float(), model.logit_scale.exp().item(), mean, std, size, classnames, model_name
    )
    classifier.train()  # the tower was put in eval() to build the head
    return classifier.to(device) if device is not None else classifier


def create_clip_teacher(
    model_name: str = "dad-tiny-clip",
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence | str | None = None,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The frozen teacher: images in [0, 1] ``[B, 3, H, W]`` -> logits ``[B, C]``.

    Args:
        model_name: open_clip model config name (``ViT-L-14`` for the paper, ``dad-tiny-clip`` for the defaults).
        pretrained: open_clip pretrained tag (``openai``) or weights file; None = random weights, offline.
        checkpoint: loaded over the model. One of: a file written by :func:`save_teacher_checkpoint`
            (fine-tuned tower + head, class list checked), full open_clip weights (``visual.*``, ``transformer.*``
            keys; the zero-shot head is rebuilt from them), or ``timm:<model name>[=<weights file>]`` for timm's
            fine-tuned CLIP classifiers.
        classnames: class names; default the ImageNet names shipped in open_clip.
        templates: prompt templates or a set name; default ``openai`` (the 80 OpenAI ImageNet templates).
        device: target device.

    Returns:
        A frozen module in eval mode.

    Raises:
        TeacherCheckpointError: the checkpoint does not fit the model or its class list differs from ``classnames``.
        FileNotFoundError: the checkpoint file is missing.
    """
    checkpoint = str(checkpoint) if checkpoint is not None else None
    if checkpoint and checkpoint.startswith("timm:"):
        return freeze(_create_timm_teacher(checkpoint[len("timm:") :], device))
    state = _load_file(checkpoint) if checkpoint else None
    ours = isinstance(state, dict) and state.get("format") == _CHECKPOINT_FORMAT
    if ours:
        model_name = state.get("model_name", model_name)
        saved = tuple(state["classnames"])
        if classnames is not None and tuple(classnames) != saved:
            raise TeacherCheckpointError(
                f"teacher checkpoint {checkpoint} was fine-tuned on {len(saved)} classes {list(saved[:5])}..., "
                f"which do not match the requested {len(classnames)} classes {list(classnames)[:5]}..."
            )
        classnames = saved
    elif state is not None and not (isinstance(state, dict) and any(str(k).startswith("visual.") for k in state)):
        found = f"keys like {list(state)[:5]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise TeacherCheckpointError(
            f"{checkpoint}: not a teacher checkpoint (expected a dad-clip-classifier file or open_clip weights "
            f"with 'visual.*' keys; found {found})"
        )
    teacher = create_clip_classifier(
        model_name,
        None if ours else pretrained,
        classnames,
        templates,
        device=device,
        clip_state_dict=None if ours else state,
        build_head=not ours,
    )
    if ours:
        try:
            teacher.load_state_dict(state["state_dict"])
        except RuntimeError as err:
            from dad_core.serialization import state_dict_mismatch

            raise TeacherCheckpointError(
                f"{checkpoint} does not fit {model_name}: {state_dict_mismatch(err)}"
            ) from None
    return freeze(teacher)


def _create_timm_teacher(spec: str, device: str | torch.device | None) -> nn.Module:
    import timm

    name, _, weights = spec.partition("=")
    overlay = {"file": weights} if weights else None
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    teacher = TimmTeacher(model)
    return teacher.to(device) if device is not None else teacher


def save_teacher_checkpoint(model: CLIPClassifier, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a fine-tuned classifier (tower + head + class list) that ``create_clip_teacher`` loads.

    Safetensors, with the class list and settings as JSON metadata (:func:`dad_core.serialization.save_tree`),
    so loading it can never run code.
    """
    from dad_core.io import atomic_path
    from dad_core.serialization import save_tree

    blob = {
        "format": _CHECKPOINT_FORMAT,
        "model_name": model.model_name,
        "classnames": list(model.classnames),
        "image_size": model.image_size,
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    return atomic_path(Path(path), lambda tmp: save_tree(blob, tmp))
