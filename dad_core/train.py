"""Distributed DAD training: one entry point for a single process and ``torchrun --nproc_per_node N``.

``fit`` builds the student (DDP-wrapped when distributed), the task (teacher only in online mode), timm's
optimizer and scheduler, optional EMA, and runs the loop with bf16 autocast and channels_last on GPU, gradient
accumulation and clipping. Rank 0 writes atomic checkpoints holding everything a resume needs (model, EMA,
optimizer, scheduler, step, epoch, position in the epoch, RNG states) and logs to MLflow when configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dad_core.checkpoint import load_checkpoint, save_checkpoint
from dad_core.config import DADConfig, config_hash, config_to_dict, save_config
from dad_core.data import create_eval_transform, open_split, read_classes
from dad_core.distributed import barrier, init_distributed, is_primary, set_seed
from dad_core.errors import DADError
from dad_core.io import atomic_write_json, sha256_if_file
from dad_core.progress import progress_bar
from dad_core.student import create_student, unwrap_model
from dad_core.task import DADTask
from dad_core.teacher_cache import cache_dependencies, dataset_hash, load_teacher_cache
from dad_core.train_data import REPLAY_HOST_KEYS, CleanViews, DADPairs, ResumableSampler, replay_views

__all__ = ["TrainState", "fit"]

_logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    history: list[dict[str, float]] = field(default_factory=list)


def _expected_deps(cfg: DADConfig, data_root: Path) -> dict[str, Any]:
    """What the cache must have been made from, as far as the training config can tell."""
    deps = cache_dependencies(
        cfg,
        dataset=dataset_hash(data_root),
        teacher_checkpoint_sha256=sha256_if_file(cfg.teacher.checkpoint),
        vqgan_checkpoint_sha256=sha256_if_file(cfg.vqgan.checkpoint),
    )
    for key in ("package_version", "shard_size", "batch_size"):  # how the cache was made, not what it holds
        deps.pop(key)
    if cfg.train.teacher_mode == "online" or deps["views"]["views"] == 0:
        deps.pop("views")  # the stored views only matter when they are replayed
    return deps


def _build_teacher(cfg: DADConfig, classnames: list[str], device: torch.device) -> nn.Module:
    from dad_core.teacher import create_clip_teacher

    return create_clip_teacher(
        cfg.teacher.model_name,
        cfg.teacher.pretrained,
        cfg.teacher.checkpoint,
        classnames,
        cfg.teacher.templates,
        device=device,
    )


def _build_optimization(cfg: DADConfig, model: nn.Module, steps_per_epoch: int, device: torch.device):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    t = cfg.train
    # Fused AdamW/SGD kernels on GPU (one launch for all parameters); timm passes the flag to torch.optim.
    kwargs = {"fused": True} if device.type == "cuda" and t.optimizer.lower() in ("adamw", "adam", "sgd") else {}
    optimizer = create_optimizer_v2(model, opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        min_lr=t.min_lr,
        updates_per_epoch=steps_per_epoch,
        warmup_lr=t.lr * 0.01,
    )
    return optimizer, scheduler


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Run:
    """Everything the loop mutates, gathered so checkpointing is one function."""

    cfg: DADConfig
    task: DADTask
    model: nn.Module  # the student as trained (DDP/compiled); unwrap for saving
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    mix_rng: np.random.Generator
    state: TrainState
    meta: dict[str, Any]

    def save(self, directory: Path) -> None:
        payload = {
            "model": unwrap_model(self.task.student).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "train_state": self.state.__dict__,
            "mix_rng": self.mix_rng.bit_generator.state,
            "rng": _rng_state(),
        }
        meta = {
            **self.meta,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "resume_config": _resume_view(self.cfg),
        }
        save_checkpoint(directory, payload, meta)

    def load(self, directory: Path, *, allow_changed_config: bool = False) -> None:
        payload, meta = load_checkpoint(directory)
        changed = _config_changes(meta.get("resume_config"), _resume_view(self.cfg))
        if changed and not allow_changed_config:
            raise DADError(
                f"--resume: {directory} was written under another config ({'; '.join(changed)}); rerun with the "
                "original settings, or pass --resume-changed-config to continue under the new ones"
            )
        if changed:
            _logger.warning("resuming under a changed config: %s", "; ".join(changed))
        unwrap_model(self.task.student).load_state_dict(payload["model"])
        if self.ema is not None and payload["ema"] is not None:
            self.ema.module.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = TrainState(**payload["train_state"])
        self.mix_rng.bit_generator.state = payload["mix_rng"]
        _set_rng_state(payload["rng"])


# Settings that may change between a run and its resume: where things are, how they are logged and evaluated.
_RESUME_FREE = (
    "tracking.",
    "registry.",
    "eval.",
    "data.root",
    "cache.root",
    "cache.verify",
    "train.output_dir",
    "train.num_workers",
    "train.replay_on_device",  # the same views, replayed in the loader or on the device
)


def _resume_view(cfg: DADConfig) -> dict[str, Any]:
    """The config as flat dotted keys (JSON values), without the settings a resume may change."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif not f"{prefix}{key}".startswith(_RESUME_FREE):
                flat[f"{prefix}{key}"] = value

    walk(json.loads(json.dumps(config_to_dict(cfg), default=str)), "")
    return flat


def _config_changes(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for every setting that differs; a checkpoint without a stored config has none."""
    if stored is None:
        return []
    keys = sorted(set(stored) | set(current))
    return [f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in keys if stored.get(k) != current.get(k)]


def fit(
    cfg: DADConfig,
    data_root: str | Path,
    cache_dir: str | Path | None,
    output_dir: str | Path,
    *,
    resume: bool = False,
    resume_changed_config: bool = False,
    device: str | None = None,
    stop_after_steps: int | None = None,
    progress: bool = True,
    tracker: Any = None,
    replay_views_online: bool = False,
) -> dict[str, Any]:
    """Train a student with the DAD loss; returns a JSON-able report.

    Args:
        cfg: resolved configuration (``train``, ``loss``, ``cache``/``attack`` for the cache check, ...).
        data_root: the prepared dataset (class list, dataset hash, val split for per-epoch accuracy).
        cache_dir: the teacher cache (DAD samples, labels, soft labels, stored views). Plain CE (``cfg.loss`` with
            both KL weights 0) never opens it and may pass None: it reads the train split of ``data_root``.
        output_dir: gets ``checkpoint/`` (latest, for resume), ``model/`` (final), ``config.yaml``, ``report.json``,
            ``train_curve.json`` (per epoch).
        resume: continue from ``output_dir/checkpoint`` if it exists; refused when the checkpoint was written under
            another config (the differing keys are named), unless ``resume_changed_config``.
        resume_changed_config: resume even when training settings changed (logged as a warning).
        device: override the device (default: this rank's GPU, else CPU).
        stop_after_steps: stop after this many optimizer steps without a final save (simulates a kill; tests).
        progress: progress bar on rank 0.
        tracker: an experiment tracker (``dad_core.tracking``); None = create one from ``cfg.tracking``.
        replay_views_online: in online mode, replay the stored views instead of drawing fresh ones (tests).

    Returns:
        Steps, epochs, final loss terms, val top-1 (with the test transform of ``dad evaluate``), images/s, paths.

    Raises:
        DADError: the loss needs a teacher but no ``cache_dir`` is given.
    """
    info, dev = init_distributed(device)
    data_root, output_dir = Path(data_root), Path(output_dir)
    set_seed(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    classes = read_classes(data_root / "classes.txt")
    online = cfg.train.teacher_mode == "online"
    dataset, cache_manifest = _training_data(cfg, data_root, cache_dir, len(classes), online, replay_views_online)
    if cache_manifest is None:
        cache_dir = None  # plain CE: no cache was opened, so none enters the lineage
    sampler = ResumableSampler(
        len(dataset), batch_size=cfg.train.batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=cfg.train.num_workers,
        pin_memory=dev.type == "cuda",
        drop_last=True,
    )
    run = _setup_run(cfg, classes, dev, info, sampler.batches_per_epoch, online, cache_manifest)
    if tracker is None:
        from dad_core.tracking import create_tracker

        mode = cfg.attack.mode if cfg.loss.uses_teacher else "ce"
        tracker = create_tracker(
            cfg.tracking,
            primary=is_primary(),
            run_name=f"train-student {cfg.train.model} {mode}",
            tags=_lineage(cfg, data_root, cache_dir, cache_manifest),
            kind="train-student",
        )
    run.meta["mlflow_run_id"] = tracker.run_id  # evaluation logs its metrics into the same run
    checkpoint_dir = output_dir / "checkpoint"
    if resume and any((checkpoint_dir / name).is_file() for name in ("state.safetensors", "state.pt")):
        run.load(checkpoint_dir, allow_changed_config=resume_changed_config)
        _logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            checkpoint_dir,
            run.state.step,
            run.state.epoch,
            run.state.batch_in_epoch,
        )
    if is_primary():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        tracker.log_params(config_to_dict(cfg))
    with tracker:  # a crash marks the MLflow run FAILED instead of leaving it RUNNING
        tracker.log_dataset(data_root, "training")
        validate = lambda: _val_top1(run, data_root, dev)[0]  # noqa: E731 - the loop's per-epoch validation
        report = _loop(
            run, loader, sampler, dataset, dev, checkpoint_dir, tracker, stop_after_steps, progress, validate
        )
        if report.get("stopped"):
            return report
        return _finish(run, cfg, data_root, output_dir, dev, tracker, report)


def _training_data(
    cfg: DADConfig, data_root: Path, cache_dir: str | Path | None, num_classes: int, online: bool, replay: bool
) -> tuple[CleanViews | DADPairs, dict[str, Any] | None]:
    """The training dataset and the manifest of the teacher cache it reads (None for plain CE, which reads none)."""
    t = cfg.train
    views = {
        "crop_scale": t.crop_scale,
        "hflip": t.hflip,
        "randaugment": t.randaugment,
        "randaugment_backend": t.randaugment_backend,
        "replay_on_device": t.replay_on_device,
    }
    if not cfg.loss.uses_teacher:
        if cache_dir is not None:
            _logger.info("plain CE (loss KL weights 0): the teacher cache %s is not used", cache_dir)
        images = open_split(data_root, "train", create_eval_transform(cfg.data.image_size))  # the cache's transform
        return CleanViews(images, image_size=cfg.data.image_size, seed=t.seed, **views), None
    if cache_dir is None:
        raise DADError(
            "training with a KL term needs a teacher cache (--cache, or cache.root); only plain CE "
            "(-p loss.kd_weight=0, variant A) trains without one"
        )
    # cache.verify lazy (default): every process hashes a shard when it first opens it, so start-up reads no shard;
    # full: rank 0 hashes the whole cache first (one read of it), the other ranks check the files' sizes only.
    verify = cfg.cache.verify if cfg.cache.verify != "full" or is_primary() else "none"
    cache = load_teacher_cache(
        cache_dir, num_classes=num_classes, expected=_expected_deps(cfg, data_root), verify=verify
    )
    dataset = DADPairs(
        cache,
        image_size=cfg.data.image_size,
        seed=t.seed,
        replay=not online or replay,
        with_teacher=not online,
        **views,
    )
    return dataset, cache.manifest


def _setup_run(
    cfg: DADConfig, classes, dev: torch.device, info, batches_per_epoch: int, online: bool, cache_manifest: dict | None
) -> _Run:
    t = cfg.train
    student = create_student(
        t.model, len(classes), pretrained=t.pretrained, drop_path=t.drop_path, image_size=cfg.data.image_size
    ).to(dev)
    if dev.type == "cuda" and t.channels_last:
        student = student.to(memory_format=torch.channels_last)
    ema = None
    if t.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(student, decay=t.ema_decay)
    trained: nn.Module = student
    if info.distributed:
        trained = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    if t.compile:
        trained = torch.compile(trained)
    teacher = _build_teacher(cfg, list(classes.names), dev) if online and cfg.loss.uses_teacher else None
    attack_mode = cache_manifest["attack"]["mode"] if cache_manifest is not None else "none"
    task = DADTask(
        trained,
        cfg.loss,
        num_classes=len(classes),
        teacher=teacher,
        use_dad=attack_mode != "none",
        label_smoothing=t.label_smoothing,
        mixup=t.mixup,
        cutmix=t.cutmix,
        reprob=t.reprob,
        input_mean=student.mean.detach().flatten(),  # on the student's device: random erasing copies nothing per step
        input_std=student.std.detach().flatten(),
    )
    steps_per_epoch = max(batches_per_epoch // t.grad_accum, 1)
    optimizer, scheduler = _build_optimization(cfg, student, steps_per_epoch, dev)
    meta = {
        "model": t.model,
        "num_classes": len(classes),
        "image_size": cfg.data.image_size,
        "classes": list(classes.ids),
        "class_names": list(classes.names),
        "config_hash": config_hash(cfg),
        "teacher_mode": t.teacher_mode if cfg.loss.uses_teacher else "none",
        "attack_mode": attack_mode,
        "loss_variant": cfg.loss.variant,
        "world_size": info.world_size,
    }
    return _Run(
        cfg,
        task,
        trained,
        optimizer,
        scheduler,
        ema,
        np.random.default_rng(t.seed + 7919 * info.rank),
        TrainState(),
        meta,
    )


def _autocast(cfg: DADConfig, dev: torch.device):
    enabled = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and dev.type == "cuda")
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def _to_device(
    batch: dict[str, torch.Tensor], dev: torch.device, channels_last: bool, host_keys: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``batch`` on ``dev`` (4-d tensors channels-last if asked), except ``host_keys``, which stay where they are."""
    out = {}
    for key, value in batch.items():
        if key in host_keys:
            out[key] = value
            continue
        value = value.to(dev, non_blocking=True)
        if channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def _loop(
    run: _Run, loader, sampler, dataset, dev, checkpoint_dir: Path, tracker, stop_after_steps, progress, validate
):
    cfg, t, st = run.cfg, run.cfg.train, run.state
    accum, per_epoch = t.grad_accum, sampler.batches_per_epoch
    total_steps = t.epochs * max(per_epoch // accum, 1)
    bar = progress_bar(
        total=total_steps, initial=st.step, desc="train", unit="step", enabled=progress, primary=is_primary()
    )
    channels_last = dev.type == "cuda" and t.channels_last
    run.task.train()
    seen, start, last, terms = 0, time.perf_counter(), {}, {}
    while st.epoch < t.epochs:
        sampler.set_epoch(st.epoch, st.batch_in_epoch)
        dataset.set_epoch(st.epoch)
        for batch in loader:
            # train.replay_on_device: the loader sent uint8 images and their views; make the views here, batched (the
            # view rows and RandAugment draws stay on the host, where the replay reads them)
            batch = _to_device(batch, dev, False, host_keys=REPLAY_HOST_KEYS)
            batch = replay_views(batch, cfg.data.image_size, randaugment=t.randaugment)
            batch = _to_device(batch, dev, channels_last)
            sync = (st.batch_in_epoch + 1) % accum == 0
            no_sync = run.model.no_sync if hasattr(run.model, "no_sync") and not sync else contextlib.nullcontext
            with no_sync(), _autocast(cfg, dev):
                out = run.task(batch, rng=run.mix_rng)
                (out["loss"] / accum).backward()
            st.batch_in_epoch += 1
            seen += batch["label"].shape[0]
            if not sync:
                continue
            terms = _optimizer_step(run, out)
            bar.update()
            # the loss terms are read (a wait for the GPU) only every 10 steps: a read per step would keep the host
            # from queueing the next step's work while the GPU finishes this one
            if st.step % 10 == 0 or st.step == total_steps:
                last = _as_floats(terms)
                bar.set_postfix(epoch=st.epoch, loss=f"{last['loss']:.3f}", refresh=False)
                tracker.log_metrics(
                    {**last, "images_per_s": seen / max(time.perf_counter() - start, 1e-9)}, step=st.step
                )
            if stop_after_steps is not None and st.step >= stop_after_steps:
                bar.close()
                return {"stopped": True, "step": st.step}
            if t.checkpoint_every and st.step % t.checkpoint_every == 0:
                _save(run, checkpoint_dir)
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        last = _as_floats(terms) if terms else last
        epoch = {"epoch": st.epoch, **last}
        if st.epoch < t.epochs and is_primary():  # the last epoch's is measured by _finish
            epoch["val_top1"] = validate()
            tracker.log_metrics({"val_top1": epoch["val_top1"]}, step=st.step)
            bar.set_postfix(
                epoch=st.epoch, loss=f"{last.get('loss', float('nan')):.3f}", val=f"{epoch['val_top1']:.1f}"
            )
        st.history.append(epoch)
        _save(run, checkpoint_dir)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "steps": st.step,
        "epochs": st.epoch,
        "final": last,
        "seconds": round(seconds, 2),
        "images_per_s": round(seen / max(seconds, 1e-9), 2),
    }


def _optimizer_step(run: _Run, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """Clip, step, schedule and EMA; returns the step's loss terms (detached tensors, not read yet) and the lr."""
    if run.cfg.train.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.task.student.parameters(), run.cfg.train.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.scheduler.step_update(num_updates=run.state.step)
    if run.ema is not None:
        run.ema.update(unwrap_model(run.task.student), step=run.state.step)
    terms = {k: v.detach() for k, v in out.items() if k != "output" and v.dim() == 0}
    return {**terms, "lr": run.optimizer.param_groups[0]["lr"]}


def _as_floats(terms: dict[str, torch.Tensor | float]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


def _save(run: _Run, directory: Path) -> None:
    if is_primary():
        run.save(directory)
    barrier()


def _lineage(
    cfg: DADConfig, data_root: Path, cache_dir: str | Path | None, cache_manifest: dict[str, Any] | None
) -> dict[str, str]:
    """Run tags: dataset and cache hashes, and the teacher as ``<model>:<pretrained tag or sha256:<12 hex>>`` with
    its checkpoint's full hash (from the cache manifest, which recorded the checkpoint it was made with)."""
    from dad_core.tracking import lineage_tags

    teacher, teacher_sha = None, None
    if cfg.loss.uses_teacher:  # plain CE: no teacher
        teacher_sha = ((cache_manifest or {}).get("teacher") or {}).get("checkpoint_sha256")
        teacher_sha = teacher_sha or sha256_if_file(cfg.teacher.checkpoint)
        weights = cfg.teacher.pretrained or (f"sha256:{teacher_sha[:12]}" if teacher_sha else "untrained")
        teacher = f"{cfg.teacher.model_name}:{weights}"
    return lineage_tags(
        dataset_hash=dataset_hash(data_root),
        cache_hash=sha256_if_file(Path(cache_dir) / "manifest.json") if cache_dir is not None else None,
        teacher=teacher,
        teacher_sha256=teacher_sha,
    )


def _ranks_in_sync(model: nn.Module) -> bool:
    """Give every rank rank 0's buffers, then check that all ranks hold the same weights.

    DDP keeps parameters equal and broadcasts buffers (BatchNorm statistics) at the start of each forward, so
    after the last step the buffers differ by that step's update; parameters that differ mean a bug or a bad node.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    import hashlib

    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return len(set(gathered)) == 1


def _val_top1(run: _Run, data_root: Path, dev: torch.device) -> tuple[float, dict[str, Any]]:
    """Top-1 on the val split of the weights ``load_student`` gives evaluate (the EMA's when there is one).

    The test transform is the one ``dad evaluate`` uses (eval.crop_pct / eval.interpolation, else the student's
    pretrained_cfg), so the last epoch's value is the clean top-1 evaluate reports for the same val images.
    """
    from dad_core.evaluate import resolve_eval_transform
    from dad_core.finetune import accuracy

    cfg = run.cfg
    evaluated = run.ema.module if run.ema is not None else unwrap_model(run.task.student)
    crop_pct, interpolation = resolve_eval_transform(evaluated, cfg.eval.crop_pct, cfg.eval.interpolation)
    transform = create_eval_transform(cfg.data.image_size, crop_pct=crop_pct, interpolation=interpolation)
    was_training = evaluated.training
    with torch.inference_mode():
        top1 = accuracy(evaluated, DataLoader(open_split(data_root, "val", transform), batch_size=256), dev)
    evaluated.train(was_training)
    return top1, {"crop_pct": crop_pct, "interpolation": interpolation}


def _finish(run: _Run, cfg: DADConfig, data_root: Path, output_dir: Path, dev, tracker, report) -> dict[str, Any]:
    student = unwrap_model(run.task.student)
    in_sync = _ranks_in_sync(student)
    val_top1, val_transform = _val_top1(run, data_root, dev) if is_primary() else (None, None)
    if is_primary() and run.state.history:
        run.state.history[-1]["val_top1"] = val_top1
    report = {
        **report,
        "val_top1": val_top1,
        "val_transform": val_transform,
        "ranks_in_sync": in_sync,
        "world_size": run.meta["world_size"],
        "output_dir": str(output_dir),
        "model_dir": str(output_dir / "model"),
    }
    if is_primary():
        run.meta["val_top1"] = val_top1
        save_checkpoint(
            output_dir / "model",
            {"model": student.state_dict(), "ema": run.ema.module.state_dict() if run.ema else None},
            run.meta,
        )
        atomic_write_json(output_dir / "report.json", report)
        atomic_write_json(output_dir / "train_curve.json", run.state.history)  # per epoch: its last step's losses, lr
        tracker.log_metrics({"val_top1": val_top1}, step=run.state.step)
        for name in ("config.yaml", "report.json"):
            tracker.log_artifact(output_dir / name)
        tracker.log_artifact(output_dir / "model")
        tracker.finish("FINISHED")
    barrier()
    return report
