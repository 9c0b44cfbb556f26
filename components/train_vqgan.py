"""``train_vqgan``: train a small VQGAN on the training images when no published checkpoint fits."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def train_vqgan(dataset: Input[Dataset], params: list, vqgan: Output[Model], metrics: Output[Metrics]) -> str:
    """Run ``dad train-vqgan``; returns the checkpoint's URI (imported downstream, like a given checkpoint).

    Args:
        dataset: the prepared dataset (its train split is used).
        params: dotted config overrides (``vqgan.*``).
        vqgan: the checkpoint, in the taming-transformers layout.
        metrics: reconstruction PSNR and codebook usage on held-out images.
    """
    import json
    from pathlib import Path

    from dad_core.cli import train_vqgan as cli

    report = Path(vqgan.path).with_name("vqgan_report.json")
    overrides = [arg for item in params for arg in ("-p", item)]
    code = cli.main(
        ["--data-root", dataset.path, "--output", vqgan.path, "--report", str(report), "--no-progress", *overrides]
    )
    if code != 0:
        raise RuntimeError(f"dad train-vqgan failed with exit code {code}; its message is in the log above")
    info = json.loads(report.read_text())
    scores = {f"vqgan_{key}": value for key, value in info["val"].items() if isinstance(value, int | float)}
    vqgan.metadata.update({"config": info["config"], "sha256": info["sha256"], **scores})
    for key, value in scores.items():
        metrics.log_metric(key, value)
    return vqgan.uri
