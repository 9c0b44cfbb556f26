"""``prepare_data``: write the dataset (embedded digits, a folder, or a DVC revision) as a ``Dataset`` artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def prepare_data(params: list, dataset: Output[Dataset], datasets_dir: str = ""):
    """Run ``dad prepare-data`` into the artifact; the source comes from ``data.*`` (``params`` overrides).

    Args:
        params: dotted config overrides, e.g. ``["data.source=dvc", "data.dvc_rev=v1"]``.
        dataset: the prepared dataset; its metadata holds the dataset hash and the split counts. For a folder or a DVC
            revision it holds the manifest and the class list only: the images stay where they are.
        datasets_dir: the datasets volume as this step sees it; a DVC revision is checked out once into its ``dvc/``
            folder (``data.dvc_checkouts``, unless ``params`` sets it) and read there by every step. Empty: into
            the artifact.
    """
    import json
    from pathlib import Path

    from dad_core.cli import prepare_data as cli

    report = Path(dataset.path).with_name("prepare_report.json")  # beside it: the dataset tree stays reproducible
    checkouts = [f"data.dvc_checkouts={datasets_dir.rstrip('/')}/dvc"] if datasets_dir else []
    overrides = [arg for item in [*checkouts, *params] for arg in ("-p", item)]
    code = cli.main(["--output", dataset.path, "--report", str(report), "--no-progress", *overrides])
    if code != 0:
        raise RuntimeError(f"dad prepare-data failed with exit code {code}; its message is in the log above")
    info = json.loads(report.read_text())
    dataset.metadata.update({key: info[key] for key in ("dataset_hash", "source", "num_classes")}, **info["counts"])
