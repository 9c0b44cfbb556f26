"""``finetune_teacher``: fine-tune the CLIP teacher from its zero-shot head; ``use_checkpoint``: take a given one."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def finetune_teacher(dataset: Input[Dataset], params: list, teacher: Output[Model], metrics: Output[Metrics]) -> str:
    """Run ``dad finetune-teacher``; returns the checkpoint's URI (imported downstream, like a given checkpoint).

    Args:
        dataset: the prepared dataset.
        params: dotted config overrides (``finetune.*``, ``teacher.*``).
        teacher: the fine-tuned checkpoint file.
        metrics: zero-shot and fine-tuned validation top-1.
    """
    import json
    from pathlib import Path

    from dad_core.cli import finetune_teacher as cli

    report = Path(teacher.path).with_name("finetune_report.json")
    overrides = [arg for item in params for arg in ("-p", item)]
    code = cli.main(
        ["--data-root", dataset.path, "--output", teacher.path, "--report", str(report), "--no-progress", *overrides]
    )
    if code != 0:
        raise RuntimeError(f"dad finetune-teacher failed with exit code {code}; its message is in the log above")
    info = json.loads(report.read_text())
    teacher.metadata.update({"top1": info["top1"], "zero_shot_top1": info["zero_shot_top1"], "sha256": info["sha256"]})
    metrics.log_metric("teacher_val_top1", info["top1"])
    metrics.log_metric("teacher_zero_shot_top1", info["zero_shot_top1"])
    return teacher.uri


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def use_checkpoint(uri: str) -> str:
    """The ``dsl.Else`` branch when a checkpoint is given: hands its URI on to the importer, as training would.

    Args:
        uri: an object-store URI (``s3://``, ``minio://``, ``gs://``) or, in a local run, a file path.
    """
    if not uri.strip():
        raise ValueError("use_checkpoint needs a non-empty checkpoint URI")
    return uri.strip()
