"""MLflow tracking: NullTracker when off, what MLflowTracker logs, fast failure on a dead server, retry, lineage.

Uses a fresh sqlite store per test (``mlflow_sqlite_uri`` from ``tests/servers.py``); the server test is marked
``integration``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dad_core.config import DADConfig, TrackingConfig
from dad_core.tracking import (
    MLflowTracker,
    NullTracker,
    TrackingError,
    create_tracker,
    flatten_params,
    git_sha,
    is_transient,
    lineage_tags,
    retry,
)

pytestmark = pytest.mark.usefixtures("clean_mlflow_state")


def _closed_port() -> int:
    from servers import free_port

    return free_port()


def _cfg(uri: str, **kwargs) -> TrackingConfig:
    return TrackingConfig(uri=uri, experiment="tests", system_metrics=False, **kwargs)


def _run(uri: str, run_id: str):
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id)


def test_null_tracker_without_uri_or_off_primary(mlflow_sqlite_uri):
    off = create_tracker(TrackingConfig(), primary=True)
    assert isinstance(off, NullTracker)
    assert off.run_id is None
    assert not off.enabled
    with off as tracker:  # every method is a no-op
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact("does-not-exist")
        tracker.log_dict({"a": 1}, "a.json")
        tracker.set_tags({"a": "b"})
    assert isinstance(create_tracker(_cfg(mlflow_sqlite_uri), primary=False), NullTracker)


def test_env_uri_turns_tracking_on(monkeypatch, mlflow_sqlite_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_uri)
    with create_tracker(TrackingConfig(experiment="tests", system_metrics=False), primary=True) as tracker:
        assert isinstance(tracker, MLflowTracker)
        assert tracker.run_id
    assert _run(mlflow_sqlite_uri, tracker.run_id).info.status == "FINISHED"


def test_tracker_logs_params_metrics_artifacts_and_tags(tmp_path, mlflow_sqlite_uri):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("train: {}\n")
    cfg = DADConfig()
    tags = lineage_tags(dataset_hash="d1", teacher="tiny-clip")
    with create_tracker(_cfg(mlflow_sqlite_uri), primary=True, run_name="unit", tags=tags) as tracker:
        tracker.log_params(cfg)
        tracker.log_params({"note": "x" * 7000})
        tracker.log_metrics({"loss": 1.5, "acc": np.float32(0.25), "skipped": None, "digits-C/top1": 3}, step=2)
        tracker.log_metrics({"loss": 1.0}, step=3)
        tracker.log_artifact(tmp_path / "config.yaml")
        tracker.log_artifact(tmp_path / "out", artifact_path="eval")
        tracker.log_artifact(tmp_path / "out")
        tracker.log_dict({"classes": ["a", "b"]}, "classes.json")
        tracker.set_tags({"stage": "unit"})
    run = _run(mlflow_sqlite_uri, tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["attack.norm"] == "l2"
    assert run.data.params["eval.suites"] == '["auto"]'
    assert len(run.data.params["note"]) == 6000
    assert run.data.params["note"].endswith("...")
    assert run.data.metrics == {"loss": 1.0, "acc": 0.25, "digits-C/top1": 3.0}
    assert run.data.tags["dad.dataset_hash"] == "d1"
    assert run.data.tags["dad.teacher"] == "tiny-clip"
    assert run.data.tags["stage"] == "unit"
    assert "dad.git_sha" in run.data.tags
    import mlflow

    client = mlflow.MlflowClient(mlflow_sqlite_uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5), (3, 1.0)]
    files = {a.path for folder in (None, "eval", "out") for a in client.list_artifacts(tracker.run_id, folder)}
    assert {"config.yaml", "classes.json", "eval/report.json", "out/report.json"} <= files
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())  # beside the db, not in the cwd


def test_tracker_marks_run_failed_on_exception(mlflow_sqlite_uri):
    with pytest.raises(RuntimeError, match="boom"):
        with create_tracker(_cfg(mlflow_sqlite_uri), primary=True) as tracker:
            raise RuntimeError("boom")
    assert _run(mlflow_sqlite_uri, tracker.run_id).info.status == "FAILED"
    import mlflow

    assert mlflow.active_run() is None


def test_tracker_resumes_a_run_and_nests_under_an_active_one(mlflow_sqlite_uri):
    with create_tracker(_cfg(mlflow_sqlite_uri), primary=True) as first:
        first.log_params({"lr": 0.1})
    with create_tracker(_cfg(mlflow_sqlite_uri), primary=True, run_id=first.run_id) as resumed:
        assert resumed.run_id == first.run_id
        resumed.log_params({"lr": 0.1, "epochs": 2})  # same value again is fine
        resumed.log_params({"lr": 0.5})  # a changed value is kept as it was, with a warning
        resumed.log_metrics({"loss": 0.5}, step=1)
        with create_tracker(_cfg(mlflow_sqlite_uri), primary=True, run_name="child") as child:
            child.log_metrics({"x": 1.0})
        import mlflow

        assert mlflow.active_run().info.run_id == first.run_id
    run = _run(mlflow_sqlite_uri, first.run_id)
    assert run.data.params == {"lr": "0.1", "epochs": "2"}
    assert run.data.metrics == {"loss": 0.5}
    assert run.info.status == "FINISHED"
    child_run = _run(mlflow_sqlite_uri, child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == first.run_id


def test_resuming_an_unknown_run_is_a_clear_error(mlflow_sqlite_uri):
    with pytest.raises(TrackingError, match="MLflow at sqlite"):
        create_tracker(_cfg(mlflow_sqlite_uri), primary=True, run_id="0" * 32)
    import mlflow

    assert mlflow.active_run() is None
    assert not mlflow.tracking.is_tracking_uri_set()


def test_system_metrics_start_and_stop(mlflow_sqlite_uri):
    with create_tracker(_cfg(mlflow_sqlite_uri), primary=True, system_metrics=True) as tracker:
        tracker.log_metrics({"loss": 1.0})
    assert _run(mlflow_sqlite_uri, tracker.run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast_with_a_clear_message(monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"does not answer .*unset MLFLOW_TRACKING_URI") as info:
        create_tracker(TrackingConfig(timeout_s=1.0), primary=True)
    assert time.monotonic() - start < 5.0
    assert uri in str(info.value)
    with pytest.raises(TrackingError, match="fix tracking.uri"):
        create_tracker(replace(_cfg(uri), timeout_s=0.5), primary=True)


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert retry(flaky, attempts=3, base_delay=0.0) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionError):
        retry(flaky, attempts=2, base_delay=0.0)
    with pytest.raises(ValueError):
        retry(lambda: (calls.append(1), int("x")), attempts=5, base_delay=0.0)
    assert is_transient(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not is_transient(RuntimeError("Max retries exceeded with url: /api"))
    assert not is_transient(FileNotFoundError("x"))


def test_flatten_params_dotted_keys():
    flat = flatten_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "bad key!": "v"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d": "None", "a.e": "{}", "bad key_": "v"}


def test_lineage_tags_and_git_sha(tmp_path):
    assert git_sha(tmp_path) == "unknown"
    tags = lineage_tags(repo=tmp_path, cache_hash="c1", dvc_rev=None, pipeline_run_id="p1", vqgan="tiny-f4")
    assert tags == {
        "dad.git_sha": "unknown",
        "dad.cache_hash": "c1",
        "dad.pipeline_run_id": "p1",
        "dad.vqgan": "tiny-f4",
    }
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_sha(Path(tmp_path)) == head
    assert len(head) == 40


@pytest.mark.integration
def test_tracker_against_a_real_server(tmp_path, mlflow_server_s3, seaweedfs):
    (tmp_path / "notes.txt").write_text("hello")
    with create_tracker(_cfg(mlflow_server_s3.uri), primary=True, run_name="server") as tracker:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_artifact(tmp_path / "notes.txt")
    run = _run(mlflow_server_s3.uri, tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 0.5}
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(key.endswith(f"{tracker.run_id}/artifacts/notes.txt") for key in keys), keys
