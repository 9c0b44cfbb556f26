"""The components as plain functions (``component.python_func``): argv built, metadata and metrics set.

Each test replaces the one ``dad_core`` call with a fake that records its argv and writes what the real step
writes (a report, an output folder), so no model is trained here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from components.cache_teacher import cache_teacher, collect_teacher_cache, shard_indices
from components.config_overrides import config_overrides
from components.evaluate_ood import evaluate_ood
from components.finetune_teacher import finetune_teacher, use_checkpoint
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.train_student import train_student
from components.train_vqgan import train_vqgan


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-p"]


def _fake_cli(monkeypatch, module: str, write=None, code: int = 0) -> list[list[str]]:
    """Replace ``dad_core.cli.<module>.main`` with a recorder that calls ``write(argv)`` and returns ``code``."""
    import importlib

    calls: list[list[str]] = []

    def main(argv):
        calls.append(list(argv))
        if write is not None:
            write(argv)
        return code

    monkeypatch.setattr(importlib.import_module(f"dad_core.cli.{module}"), "main", main)
    return calls


def _write_json(path: str | Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


def test_prepare_data_passes_overrides_and_records_the_dataset(tmp_path, monkeypatch):
    report = {"dataset_hash": "abc123", "source": "digits", "num_classes": 10, "counts": {"train": 9, "val": 3}}
    calls = _fake_cli(monkeypatch, "prepare_data", lambda argv: _write_json(_value(argv, "--report"), report))
    dataset = Dataset(uri=str(tmp_path / "prepare-data" / "dataset"))

    prepare_data.python_func(params=["data.source=digits", "data.seed=1"], dataset=dataset)

    (argv,) = calls
    assert _value(argv, "--output") == dataset.path
    assert Path(_value(argv, "--report")).parent == Path(dataset.path).parent  # beside the dataset, not inside
    assert _overrides(argv) == ["data.source=digits", "data.seed=1"]
    assert dataset.metadata == {"dataset_hash": "abc123", "source": "digits", "num_classes": 10, "train": 9, "val": 3}


def test_a_failing_step_raises(tmp_path, monkeypatch):
    _fake_cli(monkeypatch, "prepare_data", code=2)
    with pytest.raises(RuntimeError, match="exit code 2"):
        prepare_data.python_func(params=[], dataset=Dataset(uri=str(tmp_path / "dataset")))


def test_finetune_teacher_returns_its_uri_and_logs_top1(tmp_path, monkeypatch):
    report = {"top1": 91.5, "zero_shot_top1": 40.0, "sha256": "f00"}
    calls = _fake_cli(monkeypatch, "finetune_teacher", lambda argv: _write_json(_value(argv, "--report"), report))
    dataset = Dataset(uri=str(tmp_path / "dataset"))
    teacher, metrics = Model(uri=str(tmp_path / "ft" / "teacher")), Metrics(uri=str(tmp_path / "ft" / "metrics"))

    uri = finetune_teacher.python_func(dataset=dataset, params=["finetune.epochs=1"], teacher=teacher, metrics=metrics)

    (argv,) = calls
    assert _value(argv, "--data-root") == dataset.path and _value(argv, "--output") == teacher.path
    assert _overrides(argv) == ["finetune.epochs=1"]
    assert uri == teacher.uri
    assert teacher.metadata == {"top1": 91.5, "zero_shot_top1": 40.0, "sha256": "f00"}
    assert metrics.metadata == {"teacher_val_top1": 91.5, "teacher_zero_shot_top1": 40.0}


def test_use_checkpoint_hands_the_uri_on():
    assert use_checkpoint.python_func(uri=" s3://models/teacher.safetensors ") == "s3://models/teacher.safetensors"
    with pytest.raises(ValueError, match="non-empty"):
        use_checkpoint.python_func(uri="  ")


def test_train_vqgan_logs_numeric_scores(tmp_path, monkeypatch):
    report = {"config": "tiny-f4", "sha256": "beef", "val": {"psnr_db": 24.5, "codebook_usage": 0.8, "note": "x"}}
    calls = _fake_cli(monkeypatch, "train_vqgan", lambda argv: _write_json(_value(argv, "--report"), report))
    vqgan, metrics = Model(uri=str(tmp_path / "vq" / "vqgan")), Metrics(uri=str(tmp_path / "vq" / "metrics"))

    uri = train_vqgan.python_func(dataset=Dataset(uri=str(tmp_path / "d")), params=[], vqgan=vqgan, metrics=metrics)

    assert _value(calls[0], "--output") == vqgan.path and uri == vqgan.uri
    assert metrics.metadata == {"vqgan_psnr_db": 24.5, "vqgan_codebook_usage": 0.8}
    assert vqgan.metadata["config"] == "tiny-f4" and vqgan.metadata["sha256"] == "beef"


def test_shard_indices():
    assert shard_indices.python_func(num_shards=3) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_shards"):
        shard_indices.python_func(num_shards=0)


def test_cache_teacher_worker_writes_into_the_shared_folder(tmp_path, monkeypatch):
    cache_dir = tmp_path / "work" / "cache" / "run-1"
    calls = _fake_cli(
        monkeypatch,
        "cache_teacher",
        lambda argv: _write_json(_value(argv, "--report"), {"images_per_s": 5.0, "complete": False}),
    )
    teacher, vqgan = Model(uri=str(tmp_path / "teacher.safetensors")), Model(uri=str(tmp_path / "vqgan.ckpt"))

    out = cache_teacher.python_func(
        dataset=Dataset(uri=str(tmp_path / "d")),
        teacher=teacher,
        vqgan=vqgan,
        cache_dir=str(cache_dir),
        shard_index=1.0,
        num_shards=2,
        params=["cache.views=1"],
    )

    (argv,) = calls
    assert _value(argv, "--output") == str(cache_dir)
    assert _value(argv, "--teacher-checkpoint") == teacher.path and _value(argv, "--vqgan-checkpoint") == vqgan.path
    assert (_value(argv, "--shard-index"), _value(argv, "--num-shards")) == ("1", "2")  # a float item is cast
    assert _value(argv, "--report") == str(cache_dir / "report-1.json")
    assert _overrides(argv) == ["cache.views=1"]
    assert json.loads(out)["images_per_s"] == 5.0


def test_collect_teacher_cache_points_at_the_shared_folder(tmp_path):
    manifest = {"dataset_hash": "abc", "num_samples": 12, "num_shards": 3, "shards": {}}
    _write_json(tmp_path / "cache" / "manifest.json", manifest)
    artifact = Dataset(uri=str(tmp_path / "collect" / "teacher_cache"))
    Path(artifact.path).parent.mkdir()  # the executor makes the output's folder
    reports = [json.dumps({"images_per_s": 2.5}), json.dumps({"images_per_s": 3.0})]

    collect_teacher_cache.python_func(cache_dir=str(tmp_path / "cache"), worker_reports=reports, teacher_cache=artifact)

    assert json.loads(Path(artifact.path).read_text()) == manifest
    meta = artifact.metadata
    assert meta["path"] == str(tmp_path / "cache") and meta["num_samples"] == 12 and meta["images_per_s"] == 5.5
    assert len(meta["manifest_sha256"]) == 64


def test_collect_teacher_cache_refuses_an_unfinished_cache(tmp_path):
    with pytest.raises(RuntimeError, match="incomplete"):
        collect_teacher_cache.python_func(
            cache_dir=str(tmp_path), worker_reports=[], teacher_cache=Dataset(uri=str(tmp_path / "out"))
        )


def _train_inputs(tmp_path: Path, backend: str) -> dict:
    data = tmp_path / "prepare-data" / "dataset"
    (data / "train").mkdir(parents=True)
    (data / "classes.txt").write_text("0\n1\n")
    cache = Dataset(uri=str(tmp_path / "collect" / "teacher_cache"))
    cache.metadata["path"] = str(tmp_path / "work" / "cache" / "run-7")
    return {
        "dataset": Dataset(uri=str(data)),
        "teacher_cache": cache,
        "params": ["train.epochs=1"],
        "mlflow_tracking_uri": "sqlite:///x.db",
        "backend": backend,
        "nproc_per_node": 2,
        "num_nodes": 2,
        "gpus_per_node": 4,
        "workdir": str(tmp_path / "work"),
        "run_id": "run-7",
        "job": {"image": "img:1", "namespace": "dad", "runtime": "dad-torch-distributed"},
        "mounts": {"/mnt/dad-work": "dad-teacher-cache"},
        "tolerations": [{"key": "nvidia.com/gpu"}],
        "node_selector": {"pool": "gpu"},
        "student": Model(uri=str(tmp_path / "train" / "student")),
        "metrics": Metrics(uri=str(tmp_path / "train" / "metrics")),
    }


def _fake_launcher(monkeypatch) -> list[dict]:
    import dad_core.launch

    calls: list[dict] = []

    def launch_training(**kwargs):
        calls.append(kwargs)
        output = Path(_value(list(kwargs["train_args"]), "--output"))
        (output / "model").mkdir(parents=True, exist_ok=True)
        _write_json(
            output / "report.json", {"val_top1": 88.0, "images_per_s": 120.0, "steps": 10, "epochs": 1, "world_size": 2}
        )

    monkeypatch.setattr(dad_core.launch, "launch_training", launch_training)
    return calls


def test_train_student_local_runs_torchrun_into_the_artifact(tmp_path, monkeypatch):
    calls = _fake_launcher(monkeypatch)
    inputs = _train_inputs(tmp_path, "local")

    uri = train_student.python_func(**inputs)

    (call,) = calls
    args = list(call["train_args"])
    assert call["backend"] == "local" and call["nproc_per_node"] == 2 and call["job"] is None
    assert _value(args, "--data-root") == inputs["dataset"].path
    assert _value(args, "--cache") == str(tmp_path / "work" / "cache" / "run-7")
    assert _value(args, "--output") == inputs["student"].path and "--resume" in args
    assert _overrides(args) == ["train.epochs=1", "tracking.uri=sqlite:///x.db"]
    assert uri == inputs["student"].uri
    assert inputs["student"].metadata == {
        "val_top1": 88.0,
        "images_per_s": 120.0,
        "steps": 10,
        "epochs": 1,
        "world_size": 2,
    }
    assert inputs["metrics"].metadata == {"student_val_top1": 88.0}


def test_train_student_kubernetes_stages_on_the_shared_volume(tmp_path, monkeypatch):
    from dad_core.launch import job_name

    calls = _fake_launcher(monkeypatch)
    inputs = _train_inputs(tmp_path, "kubernetes")

    train_student.python_func(**inputs)

    (call,) = calls
    args, job = list(call["train_args"]), call["job"]
    stage = tmp_path / "work" / "runs" / "run-7"
    assert _value(args, "--data-root") == str(stage / "data") and (stage / "data" / "classes.txt").is_file()
    assert _value(args, "--output") == str(stage / "train")
    assert (job.name, job.image, job.namespace, job.runtime) == (
        job_name("run-7"),
        "img:1",
        "dad",
        "dad-torch-distributed",
    )
    assert (job.num_nodes, job.gpus_per_node) == (2, 4)
    assert dict(job.pvc_mounts) == {"dad-teacher-cache": "/mnt/dad-work"}
    assert list(job.tolerations) == [{"key": "nvidia.com/gpu"}] and dict(job.node_selector) == {"pool": "gpu"}
    assert (Path(inputs["student"].path) / "report.json").is_file()  # copied back into the artifact
    assert inputs["student"].metadata["val_top1"] == 88.0


def test_evaluate_ood_logs_per_suite_scalars_and_an_html_report(tmp_path, monkeypatch):
    suites = {
        "digits": {"status": "ok", "kind": "clean", "top1": 90.0, "count": 10},
        "digits-c": {"status": "ok", "kind": "corruption", "top1": 55.0, "count": 30},
        "digits-r": {"status": "ok", "kind": "rendition", "top1": 65.0, "count": 20},
        "imagenet-a": {"status": "skipped", "kind": "natural", "reason": "folder not found"},
    }
    summary = {"clean_suite": "digits", "clean_top1": 90.0, "ood_mean_top1": 60.0}
    summary["ood_suites"] = ["digits-c", "digits-r"]

    def write(argv):
        out = Path(_value(argv, "--output"))
        _write_json(out / "eval_report.json", {**summary, "skipped": ["imagenet-a"], "suites": suites})
        (out / "eval_report.md").write_text("# report\n")
        (out / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    calls = _fake_cli(monkeypatch, "evaluate", write)
    dataset, student = Dataset(uri=str(tmp_path / "dataset")), Model(uri=str(tmp_path / "student"))
    evaluation, report = Artifact(uri=str(tmp_path / "ev" / "evaluation")), Markdown(uri=str(tmp_path / "ev" / "md"))
    metrics, chart = Metrics(uri=str(tmp_path / "ev" / "metrics")), HTML(uri=str(tmp_path / "ev" / "chart"))

    mean = evaluate_ood.python_func(
        dataset=dataset,
        student=student,
        params=["eval.batch_size=8"],
        evaluation=evaluation,
        report=report,
        metrics=metrics,
        chart=chart,
    )

    (argv,) = calls
    assert _value(argv, "--checkpoint") == str(Path(student.path) / "model")
    assert _value(argv, "--output") == evaluation.path
    assert _overrides(argv) == ["eval.batch_size=8", f"data.root={dataset.path}"]
    assert mean == 60.0
    assert metrics.metadata == {
        "clean_top1": 90.0,
        "ood_mean_top1": 60.0,
        "digits_top1": 90.0,
        "digits-c_top1": 55.0,
        "digits-r_top1": 65.0,
    }  # the skipped suite enters no metric
    assert Path(report.path).read_text() == "# report\n"
    page = Path(chart.path).read_text()
    assert page.count("<tr>") == 1 + len(suites) and "imagenet-a" in page and "55.00" in page
    assert 'src="data:image/png;base64,iVBORw' in page  # the chart travels inside the page


def test_config_overrides_appends_the_knobs_that_are_set():
    params = ["train.epochs=2", "data.seed=1"]
    assert config_overrides.python_func(params=params) == params  # nothing set: params as they are
    merged = config_overrides.python_func(params=params, epochs=5, attack_mode="none", eps=0.05, loss_variant="C")
    assert merged == [*params, "train.epochs=5", "attack.mode=none", "attack.eps=0.05", "loss.variant=C"]
    from dad_core.config import load_config

    cfg = load_config(None, merged)  # later entries win: the knob over the params entry
    assert cfg.train.epochs == 5 and cfg.attack.mode == "none" and cfg.loss.variant == "C"


def test_config_overrides_give_every_step_the_tracking_server_and_the_pipeline_run():
    merged = config_overrides.python_func(
        params=["tracking.uri=sqlite:///x.db"], mlflow_tracking_uri="http://mlflow:5000", pipeline_run_id="0123"
    )
    assert merged[1:] == ['tracking.uri="http://mlflow:5000"', 'tracking.pipeline_run_id="0123"']
    from dad_core.config import load_config

    cfg = load_config(None, merged)
    assert cfg.tracking.uri == "http://mlflow:5000" and cfg.tracking.pipeline_run_id == "0123"  # a string, not 123


def test_register_model_sets_the_challenger_with_lineage_tags(tmp_path, monkeypatch):
    result = {
        "name": "dad-student",
        "version": "3",
        "model_uri": "models:/dad-student/3",
        "run_id": "r1",
        "aliases": ["challenger"],
    }
    calls = _fake_cli(monkeypatch, "register", lambda argv: _write_json(_value(argv, "--output"), result))
    dataset = Dataset(uri=str(tmp_path / "dataset"), metadata={"dataset_hash": "abc"})
    registration = Artifact(uri=str(tmp_path / "reg" / "registration"))

    uri = register_model.python_func(
        student=Model(uri=str(tmp_path / "student")),
        evaluation=Artifact(uri=str(tmp_path / "evaluation")),
        dataset=dataset,
        model_name="dad-student",
        mlflow_tracking_uri="http://mlflow:5000",
        run_id="run-9",
        params=[],
        registration=registration,
    )

    (argv,) = calls
    assert _value(argv, "--checkpoint") == str(tmp_path / "student" / "model")
    assert _value(argv, "--eval-report") == str(tmp_path / "evaluation" / "eval_report.json")
    assert (_value(argv, "--name"), _value(argv, "--alias")) == ("dad-student", "challenger")
    assert _value(argv, "--tracking-uri") == "http://mlflow:5000"
    assert {"--tag=dad.pipeline_run_id=run-9", "--tag=dad.dataset_hash=abc"} <= set(argv)
    assert uri == "models:/dad-student/3"
    assert registration.metadata == {
        **{k: result[k] for k in ("name", "version", "model_uri", "run_id")},
        "aliases": ["challenger"],
    }


def test_train_student_kubernetes_stages_the_manifest_not_the_images(tmp_path, monkeypatch):
    """A folder or DVC dataset stays on the datasets volume: the stage gets its manifest and class list only."""
    calls = _fake_launcher(monkeypatch)
    inputs = _train_inputs(tmp_path, "kubernetes")
    volume = tmp_path / "datasets" / "dvc" / "repo-1" / "abc" / "digits"
    for rel in ("train/0/a.png", "train/1/b.png"):
        (volume / rel).parent.mkdir(parents=True, exist_ok=True)
        (volume / rel).write_bytes(b"\x89PNG")
    files = {"train/0/a.png": "0" * 64, "train/1/b.png": "1" * 64}
    _write_json(Path(inputs["dataset"].path) / "manifest.json", {"root": str(volume), "files": files})
    inputs["mounts"] = {"/mnt/dad-work": "dad-teacher-cache", "/mnt/datasets": "dad-datasets"}

    train_student.python_func(**inputs)

    (call,) = calls
    stage = Path(_value(list(call["train_args"]), "--data-root"))
    assert sorted(p.name for p in stage.rglob("*") if p.is_file()) == ["classes.txt", "manifest.json"]
    assert json.loads((stage / "manifest.json").read_text())["root"] == str(volume)  # read in place by the pods
    assert dict(call["job"].pvc_mounts) == {"dad-teacher-cache": "/mnt/dad-work", "dad-datasets": "/mnt/datasets"}


def test_prepare_data_checks_dvc_revisions_out_onto_the_datasets_volume(tmp_path, monkeypatch):
    report = {"dataset_hash": "abc", "source": "dvc", "num_classes": 2, "counts": {"train": 2}}
    calls = _fake_cli(monkeypatch, "prepare_data", lambda argv: _write_json(_value(argv, "--report"), report))

    prepare_data.python_func(params=["data.source=dvc"], dataset=Dataset(uri=str(tmp_path / "d")), datasets_dir="/v/")

    (argv,) = calls
    assert _overrides(argv) == ["data.dvc_checkouts=/v/dvc", "data.source=dvc"]  # params come later: they win
