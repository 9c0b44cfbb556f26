"""How one pipeline run looks in MLflow: a parent run, a child run per step, the dataset as a run input, the
experiment in the training view, and the parent closed by the last step (or failed with a failing step)."""

from __future__ import annotations

import json

import pytest

from dad_core.config import TrackingConfig
from dad_core.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    PIPELINE_RUN_TAG,
    RUN_KIND_TAG,
    create_tracker,
    ensure_experiment,
    finish_pipeline_run,
    open_pipeline_run,
    pipeline_parent_run,
)

pytestmark = pytest.mark.usefixtures("clean_mlflow_state")


@pytest.fixture
def dataset(tmp_path):
    """A prepared dataset's manifest, as far as tracking reads it."""
    root = tmp_path / "dataset"
    root.mkdir()
    manifest = {
        "source": {"kind": "dvc", "repo": "https://git.example.com/data.git", "rev": "v1", "path": "digits"},
        "dataset_hash": "ab" * 32,
        "classes": {"ids": ["0", "1", "2"]},
        "splits": {"train": {"count": 30}, "val": {"count": 9}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cfg(uri: str, pipeline_run_id: str = "run-1") -> TrackingConfig:
    return TrackingConfig(uri=uri, experiment="pipe", system_metrics=False, pipeline_run_id=pipeline_run_id)


def test_a_pipeline_run_is_a_parent_with_a_child_per_step(mlflow_sqlite_uri, dataset):
    import mlflow

    cfg = _cfg(mlflow_sqlite_uri)
    parent = open_pipeline_run(cfg, dataset, {"train": {"epochs": 2}})
    for kind in ("finetune-teacher", "train-vqgan", "train-student"):
        with create_tracker(cfg, primary=True, run_name=kind, kind=kind) as tracker:
            tracker.log_metrics({"x": 1.0})
    finish_pipeline_run(cfg, metrics={"ood_mean_top1": 51.5, "note": "not a number"})

    client = mlflow.MlflowClient(mlflow_sqlite_uri)
    experiment = client.get_experiment_by_name("pipe")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens the training view
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    (top,) = [r for r in runs if r.data.tags.get(RUN_KIND_TAG) == "pipeline"]
    assert top.info.run_id == parent and top.info.status == "FINISHED"
    assert top.data.tags[PIPELINE_RUN_TAG] == "run-1" and top.info.run_name.startswith("pipeline ")
    assert top.data.params["train.epochs"] == "2" and top.data.metrics == {"ood_mean_top1": 51.5}
    children = {r.data.tags[RUN_KIND_TAG]: r for r in runs if r.info.run_id != parent}
    assert set(children) == {"finetune-teacher", "train-vqgan", "train-student"}
    for child in children.values():
        assert child.data.tags[PARENT_TAG] == parent and child.data.tags[PIPELINE_RUN_TAG] == "run-1"

    (prepared,) = top.inputs.dataset_inputs
    assert prepared.dataset.digest == ("ab" * 32)[:36] and prepared.dataset.source_type == "dvc"
    assert json.loads(prepared.dataset.source) == {
        "kind": "dvc",
        "repo": "https://git.example.com/data.git",
        "rev": "v1",
        "path": "digits",
    }
    assert json.loads(prepared.dataset.profile)["dataset_hash"] == "ab" * 32
    assert {(t.key, t.value) for t in prepared.tags} == {("mlflow.data.context", "prepared")}


def test_a_failing_step_marks_the_pipeline_run_failed(mlflow_sqlite_uri, dataset):
    import mlflow

    cfg = _cfg(mlflow_sqlite_uri, "run-2")
    parent = open_pipeline_run(cfg, dataset, {})
    with pytest.raises(RuntimeError), create_tracker(cfg, primary=True, run_name="x", kind="train-student"):
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(mlflow_sqlite_uri).get_run(parent).info.status == "FAILED"


def test_steps_without_a_pipeline_run_are_plain_runs(mlflow_sqlite_uri):
    import mlflow

    with create_tracker(_cfg(mlflow_sqlite_uri, ""), primary=True, run_name="alone", kind="train-student") as tracker:
        run_id = tracker.run_id
    tags = mlflow.MlflowClient(mlflow_sqlite_uri).get_run(run_id).data.tags
    assert PARENT_TAG not in tags and PIPELINE_RUN_TAG not in tags and tags[RUN_KIND_TAG] == "train-student"


def test_two_creators_of_one_parent_settle_on_the_oldest(mlflow_sqlite_uri):
    """A second parent made by a racing step is deleted; both steps end up under the same one."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_sqlite_uri)
    experiment_id = ensure_experiment(client, "pipe", mlflow_sqlite_uri)
    tags = {PIPELINE_RUN_TAG: "run-3", RUN_KIND_TAG: "pipeline"}
    first = client.create_run(experiment_id, tags=tags, start_time=1000).info.run_id
    second = client.create_run(experiment_id, tags=tags, start_time=2000).info.run_id
    assert pipeline_parent_run(client, experiment_id, "run-3") == first
    assert client.get_run(second).info.lifecycle_stage == "active"  # found, not created: nothing to delete

    class Late:  # a creator whose own parent turns out to be the younger one
        def __getattr__(self, name):
            return getattr(client, name)

        def search_runs(self, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return [] if self.calls == 1 else client.search_runs(*args, **kwargs)

    assert pipeline_parent_run(Late(), experiment_id, "run-3") == first
    live = client.search_runs([experiment_id], f"tags.`{PIPELINE_RUN_TAG}` = 'run-3'")
    assert sorted(r.info.run_id for r in live) == sorted([first, second])  # the late creator deleted its own


def test_an_existing_experiment_gets_the_training_view_unless_a_kind_was_chosen(mlflow_sqlite_uri):
    import mlflow

    client = mlflow.MlflowClient(mlflow_sqlite_uri)
    plain = client.create_experiment("old")
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(client, "old", mlflow_sqlite_uri)
    ensure_experiment(client, "genai", mlflow_sqlite_uri)
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
