"""DAD on Kubeflow: Discrete Adversarial Distillation of OOD robustness from CLIP into small timm models.

Importing the package is cheap (no torch); the public API loads on first use.
"""

from __future__ import annotations

import importlib

from dad_core._version import __version__

_API = {
    "DADConfig": "dad_core.config",
    "load_config": "dad_core.config",
    "save_config": "dad_core.config",
    "create_clip_teacher": "dad_core.teacher",
    "VQGAN": "dad_core.vqgan",
    "pgd_attack": "dad_core.attack",
    "generate_dad_samples": "dad_core.attack",
    "DADLoss": "dad_core.losses",
    "kd_kl_loss": "dad_core.losses",
    "ImageFolderDataset": "dad_core.data",
    "read_classes": "dad_core.data",
    "save_checkpoint": "dad_core.checkpoint",
    "load_checkpoint": "dad_core.checkpoint",
    "prepare_digits": "dad_core.prepare",
    "finetune_teacher": "dad_core.finetune",
    "train_vqgan": "dad_core.vqgan_train",
    "cache_teacher": "dad_core.teacher_cache",
    "load_teacher_cache": "dad_core.teacher_cache",
    "fit": "dad_core.train",
    "create_student": "dad_core.student",
    "load_student": "dad_core.student",
    "evaluate_ood": "dad_core.evaluate",
    "create_tracker": "dad_core.tracking",
    "register_model": "dad_core.registry",
    "promote": "dad_core.registry",
    "launch_training": "dad_core.launch",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dad_core' has no attribute {name!r}")
