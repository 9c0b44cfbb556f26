"""Model registry: register -> aliases -> load identical; the promotion gate; the register/promote CLIs.

Uses a fresh sqlite store per test (``mlflow_sqlite_uri`` from ``tests/servers.py``) and a tiny timm student saved
as a training checkpoint; the server test is marked ``integration``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dad_core.checkpoint import save_checkpoint
from dad_core.config import TrackingConfig
from dad_core.mlflow_model import load_student_model
from dad_core.registry import (
    PromotionDecision,
    RegistryError,
    format_table,
    load_eval_metrics,
    promote,
    register_model,
)
from dad_core.student import create_student
from dad_core.tracking import TrackingError, create_tracker

CLASSES = ["zero", "one", "two"]


pytestmark = pytest.mark.usefixtures("clean_mlflow_state")


@pytest.fixture
def checkpoint(tmp_path):
    """A student checkpoint as training writes it: ``state.safetensors`` + ``meta.json``; returns (dir, model)."""
    student = create_student("test_resnet", len(CLASSES), image_size=16).eval()
    meta = {"model": "test_resnet", "num_classes": 3, "image_size": 16, "classes": CLASSES, "teacher": "tiny-clip"}
    directory = save_checkpoint(tmp_path / "student", {"model": student.state_dict()}, meta)
    return directory, student


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


def _register(checkpoint, uri, ood, clean, **kwargs):
    metrics = {"ood_mean_top1": ood, "clean_top1": clean}
    return register_model(checkpoint[0], metrics, name="student", tracking_uri=uri, **kwargs)


def test_first_registration_is_challenger_and_champion_and_loads_identically(checkpoint, mlflow_sqlite_uri):
    import mlflow

    result = _register(checkpoint, mlflow_sqlite_uri, 50.0, 90.0, tags={"dad.dvc_rev": "abc123"})
    assert result["name"] == "student"
    assert result["version"] == "1"
    assert result["model_uri"] == "models:/student/1"
    assert result["aliases"] == ["challenger", "champion"]
    version = _client(mlflow_sqlite_uri).get_model_version_by_alias("student", "champion")
    assert str(version.version) == "1"
    assert sorted(version.aliases) == ["challenger", "champion"]
    assert version.run_id == result["run_id"]
    tags = version.tags
    assert tags["dad.metric.ood_mean_top1"] == "50.0"
    assert tags["dad.dvc_rev"] == "abc123"
    assert tags["dad.teacher"] == "tiny-clip"
    assert tags["dad.student"] == "test_resnet"
    assert "dad.git_sha" in tags
    assert tags["dad.promotion"] == "accepted"
    assert _client(mlflow_sqlite_uri).get_run(result["run_id"]).data.metrics == {
        "ood_mean_top1": 50.0,
        "clean_top1": 90.0,
    }

    mlflow.set_tracking_uri(mlflow_sqlite_uri)
    loaded = load_student_model("models:/student@champion")
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), checkpoint[1](images))
        expected = checkpoint[1](images).argmax(-1).tolist()
    predictions = mlflow.pyfunc.load_model("models:/student@champion").predict(images.numpy())
    assert predictions["label"].tolist() == expected
    assert predictions["class_id"].tolist() == [CLASSES[i] for i in expected]
    info = mlflow.models.get_model_info("models:/student@champion")
    assert info.flavors["python_function"]["loader_module"] == "dad_core.mlflow_model"
    assert set(info.flavors) == {"python_function"}  # no pytorch (pickle) flavor
    model_info = json.loads(
        Path(mlflow.artifacts.download_artifacts("models:/student@champion"))
        .joinpath("data", "student", "model_info.json")
        .read_text()
    )
    assert model_info["classes"] == CLASSES
    assert model_info["preprocessing"]["image_size"] == 16
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 16, 16]
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/student/1")).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


def test_promotion_gate_rejects_worse_and_moves_champion_to_better(checkpoint, mlflow_sqlite_uri):
    _register(checkpoint, mlflow_sqlite_uri, 50.0, 90.0)
    assert promote("student", tracking_uri=mlflow_sqlite_uri).outcome == "unchanged"  # v1 already champion

    _register(checkpoint, mlflow_sqlite_uri, 48.0, 91.0)  # worse OOD
    rejected = promote("student", tracking_uri=mlflow_sqlite_uri)
    assert (rejected.outcome, rejected.challenger_version, rejected.champion_version) == ("rejected", "2", "1")
    assert rejected.champion == "1"
    assert "below the margin" in rejected.reason
    client = _client(mlflow_sqlite_uri)
    assert str(client.get_model_version_by_alias("student", "champion").version) == "1"
    tags = client.get_model_version("student", "2").tags
    assert tags["dad.promotion"] == "rejected"
    assert tags["dad.promotion_compared_to"] == "1"
    assert tags["dad.promotion_reason"] == rejected.reason

    _register(checkpoint, mlflow_sqlite_uri, 55.0, 89.5)  # better OOD, clean within tolerance
    accepted = promote("student", tracking_uri=mlflow_sqlite_uri, margin=1.0)
    assert accepted.promoted
    assert accepted.champion == "3"
    assert str(client.get_model_version_by_alias("student", "champion").version) == "3"
    assert client.get_model_version("student", "3").tags["dad.promotion"] == "accepted"

    _register(checkpoint, mlflow_sqlite_uri, 60.0, 85.0)  # better OOD, but clean drops too much
    dropped = promote("student", tracking_uri=mlflow_sqlite_uri)
    assert dropped.outcome == "rejected"
    assert "clean_top1 drops by 4.5000" in dropped.reason
    assert str(client.get_model_version_by_alias("student", "champion").version) == "3"

    table = format_table(accepted)
    assert "champion v1" in table
    assert "challenger v3" in table
    assert "55.0000" in table
    assert "+5.0000" in table
    assert "-0.5000" in table


def test_promotion_reads_run_metrics_when_tags_are_gone(checkpoint, mlflow_sqlite_uri):
    _register(checkpoint, mlflow_sqlite_uri, 50.0, 90.0)
    _register(checkpoint, mlflow_sqlite_uri, 52.0, 90.0)
    client = _client(mlflow_sqlite_uri)
    for version in ("1", "2"):
        for key in ("dad.metric.ood_mean_top1", "dad.metric.clean_top1"):
            client.delete_model_version_tag("student", version, key)
    assert promote("student", tracking_uri=mlflow_sqlite_uri).promoted  # from the runs' metrics

    _register(checkpoint, mlflow_sqlite_uri, 70.0, 90.0)
    decision = promote("student", tracking_uri=mlflow_sqlite_uri, metric="digits-C/top1")  # nobody has it
    assert decision.outcome == "rejected"
    assert decision.reason.startswith("cannot compare")


def test_register_into_the_training_run(checkpoint, mlflow_sqlite_uri):
    cfg = TrackingConfig(uri=mlflow_sqlite_uri, experiment="train", system_metrics=False)
    with create_tracker(cfg, primary=True, run_name="train") as tracker:
        inside = _register(checkpoint, mlflow_sqlite_uri, 50.0, 90.0, run_id=tracker.run_id)
        import mlflow

        assert mlflow.active_run().info.run_id == tracker.run_id  # the caller's run stays open
    after = _register(checkpoint, mlflow_sqlite_uri, 51.0, 90.0, run_id=tracker.run_id)  # resumed, then closed
    assert inside["run_id"] == after["run_id"] == tracker.run_id
    run = _client(mlflow_sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ood_mean_top1"] == 51.0


def test_registry_errors_are_clear(checkpoint, mlflow_sqlite_uri, tmp_path):
    from servers import free_port

    with pytest.raises(RegistryError, match="no registered model 'nobody'"):
        promote("nobody", tracking_uri=mlflow_sqlite_uri)
    with pytest.raises(RegistryError, match="alias 'v2' is not valid"):
        _register(checkpoint, mlflow_sqlite_uri, 1.0, 1.0, alias="v2")
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        register_model(
            tmp_path / "missing",
            {"ood_mean_top1": 1.0, "clean_top1": 1.0},
            name="student",
            tracking_uri=mlflow_sqlite_uri,
        )
    start = time.monotonic()
    with pytest.raises(TrackingError, match="does not answer"):
        promote("student", tracking_uri=f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    assert time.monotonic() - start < 5.0


def test_load_eval_metrics_takes_numeric_top_level_keys(tmp_path):
    report = {"clean_top1": 90, "ood_mean_top1": 61.5, "clean_suite": "val", "ood_suites": ["a"], "ok": True, "x": None}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert load_eval_metrics(path) == {"clean_top1": 90.0, "ood_mean_top1": 61.5}
    path.write_text("[1]")
    with pytest.raises(RegistryError, match="JSON object"):
        load_eval_metrics(path)


def test_format_table_without_a_champion():
    decision = PromotionDecision("m", "accepted", "first", "1", None, "ood", 0.0, "clean", 1.0, {"ood": 1.0})
    table = format_table(decision)
    assert "champion (none)" in table
    assert decision.champion == "1"
    assert decision.to_dict()["promoted"] is True


def test_register_and_promote_clis(checkpoint, mlflow_sqlite_uri, tmp_path, capsys):
    from dad_core.cli import promote as promote_cli
    from dad_core.cli import register as register_cli

    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"clean_top1": 90.0, "ood_mean_top1": 50.0, "suites": {}}))
    common = ["--tracking-uri", mlflow_sqlite_uri, "--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    argv = ["--checkpoint", str(checkpoint[0]), "--eval-report", str(report), "--name", "cli-student"]
    assert (
        register_cli.main([*argv, "--tag", "dad.pipeline_run_id=p1", "--output", str(tmp_path / "r.json"), *common])
        == 0
    )
    out = capsys.readouterr().out
    assert "version: 1" in out
    assert "alias: challenger, champion" in out
    assert json.loads((tmp_path / "r.json").read_text())["version"] == "1"
    report.write_text(json.dumps({"clean_top1": 90.0, "ood_mean_top1": 49.0}))
    assert register_cli.main([*argv, *common]) == 0
    assert promote_cli.main(["--model", "cli-student", *common]) == 0
    out = capsys.readouterr().out
    assert "decision: rejected" in out
    assert "challenger v2" in out
    assert "champion: cli-student version 1" in out
    assert register_cli.main([*argv, "--tag", "novalue", *common]) == 2
    assert "error: --tag 'novalue'" in capsys.readouterr().err


def test_clis_fail_in_one_line_when_the_server_is_down(checkpoint, tmp_path, capsys):
    from servers import free_port

    from dad_core.cli import promote as promote_cli

    (tmp_path / "c.yaml").write_text("tracking: {timeout_s: 1.0}\n")
    uri = f"http://127.0.0.1:{free_port()}"
    assert promote_cli.main(["--model", "m", "--tracking-uri", uri, "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: MLflow tracking server at {uri} does not answer")
    assert "\n" not in err


@pytest.mark.integration
def test_register_alias_and_load_through_a_server_with_s3_artifacts(checkpoint, mlflow_server_s3, seaweedfs):
    import mlflow

    uri = mlflow_server_s3.uri
    first = _register(checkpoint, uri, 50.0, 90.0)
    _register(checkpoint, uri, 52.0, 90.0)
    assert promote("student", tracking_uri=uri).promoted
    champion = _client(uri).get_model_version_by_alias("student", "champion")
    assert str(champion.version) == str(int(first["version"]) + 1)
    mlflow.set_tracking_uri(uri)
    loaded = load_student_model("models:/student@champion")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), checkpoint[1](images))
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(key.endswith("/data/student/model.safetensors") for key in keys), keys
