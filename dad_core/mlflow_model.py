"""The registered model format: safetensors weights, a JSON description, and a pyfunc that predicts labels.

An MLflow model logged by :func:`dad_core.registry.register_model` is a folder::

    MLmodel                         python_function flavor, loader_module: dad_core.mlflow_model
    data/student/model.safetensors  the student's weights (EMA when trained with it)
    data/student/model_info.json    what rebuilds the network: timm name, classes, image size, preprocessing

Nothing in it is a pickle. ``mlflow.pyfunc.load_model(uri)`` imports this module from the installed ``dad_core``
(no code travels with the model) and calls :func:`_load_pyfunc`, which builds the network with ``timm`` and reads the
weights as safetensors. :func:`load_student_model` does the same without consulting ``MLmodel`` at all, and returns
the ``torch`` module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dad_core.errors import DADError

__all__ = ["INFO_FILE", "LOADER_MODULE", "WEIGHTS_FILE", "StudentPredictor", "load_student_model", "save_model_data"]

LOADER_MODULE = "dad_core.mlflow_model"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model_info.json"
_DATA = "data"


def save_model_data(student: Any, info: dict[str, Any], folder: Path) -> Path:
    """Write ``model.safetensors`` and ``model_info.json`` into ``folder``; returns it.

    ``info`` must name the timm ``student`` and ``num_classes`` (and may carry ``image_size``, ``classes``,
    ``class_names``, ``preprocessing``).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def _build(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The student module (eval mode, CPU) and its info, from a folder written by :func:`save_model_data`."""
    from dad_core.serialization import WeightsFileError, load_tree, state_dict_mismatch
    from dad_core.student import create_student

    try:
        info = json.loads((folder / INFO_FILE).read_text())
        name, num_classes = str(info["student"]), int(info["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DADError(f"{folder / INFO_FILE}: not a DAD model description ({type(err).__name__}: {err})") from None
    weights = load_tree(folder / WEIGHTS_FILE)  # safetensors only: any other content is refused
    if not isinstance(weights, dict):
        raise WeightsFileError(f"{folder / WEIGHTS_FILE}: expected a dict of tensors")
    student = create_student(name, num_classes, image_size=info.get("image_size"))
    try:
        student.load_state_dict(weights)
    except RuntimeError as err:
        raise DADError(f"{folder / WEIGHTS_FILE}: the weights do not fit {name} ({state_dict_mismatch(err)})") from None
    return student.eval(), info


class StudentPredictor:
    """What ``mlflow.pyfunc.load_model`` returns for a DAD student: ``predict`` gives labels.

    Input: float32 images ``[B, 3, H, W]`` in [0, 1], resized and cropped as ``info["preprocessing"]`` says (the
    model normalizes internally). Output: a DataFrame with ``label`` (class index), ``class_id``, ``class_name``
    and ``probability`` (softmax of the predicted class).
    """

    def __init__(self, student: Any, info: dict[str, Any]) -> None:
        self.student = student
        self.info = info

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import pandas as pd
        import torch

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.ndim != 4 or images.shape[1] != 3:
            raise DADError(f"expected float32 images [B, 3, H, W] in [0, 1], got shape {list(images.shape)}")
        with torch.no_grad():
            probs = self.student(images).softmax(-1)
        confidence, labels = probs.max(-1)
        ids = list(self.info.get("classes") or [])
        names = list(self.info.get("class_names") or [])
        return pd.DataFrame(
            {
                "label": labels.numpy().astype(np.int64),
                "class_id": [ids[i] if i < len(ids) else str(i) for i in labels.tolist()],
                "class_name": [names[i] if i < len(names) else "" for i in labels.tolist()],
                "probability": confidence.numpy().astype(np.float32),
            }
        )


def _load_pyfunc(data_path: str) -> StudentPredictor:
    """The pyfunc entry point MLflow calls with the model's ``data`` folder."""
    return StudentPredictor(*_build(Path(data_path)))


def load_student_model(model_uri: str, *, tracking_uri: str | None = None) -> Any:
    """The registered student as a ``torch`` module, e.g. ``load_student_model("models:/dad-student@champion")``.

    Downloads the model's ``data`` folder and builds the network from its description and safetensors weights;
    ``MLmodel`` is not consulted, so nothing the artifact store holds decides which code runs.

    Raises:
        DADError: the model is not in this format, or its weights are not safetensors.
    """
    import tempfile

    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as folder:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=folder, tracking_uri=tracking_uri))
        found = sorted(local.glob(f"{_DATA}/**/{INFO_FILE}"))
        if not found:
            raise DADError(f"{model_uri}: not a DAD student model (no {_DATA}/.../{INFO_FILE}); register it again")
        student, _ = _build(found[0].parent)
    return student
