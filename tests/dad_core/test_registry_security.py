"""The registry as a trust boundary: no pickle in a registered model, a gate that refuses incomplete reports, and a
promotion lock that lets exactly one of many concurrent writers move ``champion``.

The concurrency test runs against a real ``mlflow server`` (``integration``): 5 rounds of 8 registrations started
together, each gating its own version, then a replay of every recorded decision in order.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dad_core.checkpoint import save_checkpoint
from dad_core.registry import (
    CHAMPION,
    LOCK_SUFFIX,
    SEQUENCE_TAG,
    Gate,
    RegistryError,
    gate_outcome,
    promote,
    register_model,
    version_metrics,
)
from dad_core.serialization import WeightsFileError
from dad_core.student import create_student

CLASSES = ["zero", "one", "two"]


pytestmark = pytest.mark.usefixtures("clean_mlflow_state")


@pytest.fixture
def checkpoint(tmp_path):
    student = create_student("test_resnet", len(CLASSES), image_size=16).eval()
    meta = {"model": "test_resnet", "num_classes": 3, "image_size": 16, "classes": CLASSES}
    return save_checkpoint(tmp_path / "student", {"model": student.state_dict()}, meta)


def _metrics(ood: float, clean: float) -> dict[str, float]:
    return {"ood_mean_top1": ood, "clean_top1": clean}


def test_a_report_without_the_gate_metrics_is_refused_and_nothing_is_registered(checkpoint, mlflow_sqlite_uri):
    import mlflow

    with pytest.raises(RegistryError, match=r"lack the promotion gate's \['clean_top1'\]") as info:
        register_model(checkpoint, {"ood_mean_top1": 50.0}, name="m", tracking_uri=mlflow_sqlite_uri)
    assert "\n" not in str(info.value)
    assert mlflow.MlflowClient(mlflow_sqlite_uri).search_registered_models() == []
    with pytest.raises(RegistryError, match=r"\['top1_c'\]"):
        register_model(checkpoint, _metrics(1, 1), name="m", tracking_uri=mlflow_sqlite_uri, gate=Gate("top1_c"))


def test_the_registered_model_holds_no_pickle(checkpoint, mlflow_sqlite_uri):
    import mlflow

    register_model(checkpoint, _metrics(50, 90), name="m", tracking_uri=mlflow_sqlite_uri)
    mlflow.set_tracking_uri(mlflow_sqlite_uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/m@champion"))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    for path in files:
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), f"{path} looks like a pickle / torch zip"
        assert path.suffix not in (".pkl", ".pt", ".pth"), path


def test_a_pickle_planted_in_the_artifact_store_never_runs(checkpoint, mlflow_sqlite_uri, pickle_bomb, tmp_path):
    """An attacker with write access to the artifact store swaps the weights for a pickle: loading refuses it."""
    import mlflow

    from dad_core.mlflow_model import load_student_model

    result = register_model(checkpoint, _metrics(50, 90), name="m", tracking_uri=mlflow_sqlite_uri)
    mlflow.set_tracking_uri(mlflow_sqlite_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    weights = next(model_dir.rglob("model.safetensors"))
    planted = _artifact_file(mlflow_sqlite_uri, result, weights.relative_to(model_dir))
    assert planted.is_file()
    pickle_bomb.write(planted)
    with pytest.raises(WeightsFileError, match="model.safetensors"):
        load_student_model("models:/m@champion")
    with pytest.raises(Exception, match="model.safetensors"):
        mlflow.pyfunc.load_model("models:/m@champion")
    assert not pickle_bomb.ran


def _artifact_file(uri: str, result: dict, relative: Path) -> Path:
    """The file in the local artifact store behind a registered model's artifact ``relative``."""
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(result["run_id"])
    root = Path(
        mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://")
    )
    (found,) = [p for p in root.rglob(relative.name) if p.as_posix().endswith(relative.as_posix())]
    return found


def test_a_stale_promotion_lock_is_taken_over(checkpoint, mlflow_sqlite_uri):
    import mlflow

    client = mlflow.MlflowClient(mlflow_sqlite_uri)
    client.create_registered_model(
        f"m{LOCK_SUFFIX}", tags={"dad.lock.nonce": "dead", "dad.lock.since": "0", "dad.lock.holder": "gone:1"}
    )
    result = register_model(checkpoint, _metrics(50, 90), name="m", tracking_uri=mlflow_sqlite_uri)
    assert result["aliases"] == ["challenger", "champion"]
    assert [m.name for m in client.search_registered_models()] == ["m"]  # the lock is gone again


@pytest.mark.integration
def test_concurrent_registrations_elect_exactly_one_champion_consistent_with_the_gate(
    checkpoint, mlflow_server, tmp_path
):
    """5 rounds x 8 ``dad register --promote`` processes started together, each gating its own version."""
    import mlflow

    name, uri, rng = "race", mlflow_server.uri, random.Random(0)
    (tmp_path / "none.yaml").write_text("{}\n")
    for round_ in range(5):
        workers = []
        for index in range(8):
            report = tmp_path / f"eval-{round_}-{index}.json"
            report.write_text(json.dumps(_metrics(round(rng.uniform(40, 60), 1), round(rng.uniform(85, 95), 1))))
            argv = ["register", "--checkpoint", str(checkpoint), "--eval-report", str(report), "--name", name]
            argv += ["--promote", "--tracking-uri", uri, "--config", str(tmp_path / "none.yaml")]
            workers.append(
                subprocess.Popen(  # fresh processes, as two users would start them (no fork of a threaded parent)
                    [sys.executable, "-m", "dad_core.cli.main", *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env={**os.environ, "MLFLOW_TRACKING_URI": ""},
                )
            )
        outputs = [worker.communicate(timeout=900)[0] for worker in workers]
        failed = [out[-2000:] for worker, out in zip(workers, outputs, strict=True) if worker.returncode != 0]
        assert not failed, failed

    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 40
    decided = sorted(versions, key=lambda v: int(v.tags[SEQUENCE_TAG]))
    assert [int(v.tags[SEQUENCE_TAG]) for v in decided] == list(range(1, 41))
    champion = None
    metrics = {str(v.version): version_metrics(client, v) for v in versions}
    for version in decided:
        tags, this = version.tags, str(version.version)
        if champion is None:
            expected = "accepted"
        else:
            expected, _ = gate_outcome(metrics[this], metrics[champion], Gate())
        assert tags["dad.promotion"] == expected, (this, tags)
        assert tags["dad.promotion_compared_to"] == (champion or "none"), (this, tags)
        if expected == "accepted":
            champion = this
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion
    accepted_first = [v for v in decided if v.tags["dad.promotion_compared_to"] == "none"]
    assert len(accepted_first) == 1  # exactly one "first champion"
    assert not [m.name for m in client.search_registered_models() if m.name.endswith(LOCK_SUFFIX)]
    assert promote(name, tracking_uri=uri).outcome in ("accepted", "rejected", "unchanged")


def test_a_create_that_loses_the_race_to_a_release_waits_and_takes_the_lock():
    """MLflow re-reads the existing model after a failed insert; if the holder released it meanwhile, the lost race
    is answered RESOURCE_DOES_NOT_EXIST. The writer must contend again, not fail its registration."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from dad_core.registry import _promotion_lock

    class Client:
        tracking_uri = "http://127.0.0.1:1"

        def __init__(self):
            self.models, self.creates = {}, 0

        def create_registered_model(self, name, tags, description):
            self.creates += 1
            if self.creates == 1:
                raise MlflowException("Registered Model with name=x not found", error_code=RESOURCE_DOES_NOT_EXIST)
            self.models[name] = tags

        def get_registered_model(self, name):
            if name not in self.models:
                raise MlflowException("not found", error_code=RESOURCE_DOES_NOT_EXIST)
            return type("Model", (), {"tags": self.models[name]})()

        def delete_registered_model(self, name):
            del self.models[name]

    client = Client()
    with _promotion_lock(client, "m"):
        assert f"m{LOCK_SUFFIX}" in client.models
    assert client.creates == 2 and client.models == {}
