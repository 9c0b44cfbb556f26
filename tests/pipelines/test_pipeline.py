"""The pipeline spec (compiled as the command line does it), its command line, and a real local run.

The golden spec is ``tests/pipelines/golden/dad_pipeline.golden.yaml``; after an intended change to a component or the
pipeline, rewrite it with ``UPDATE_GOLDEN=1 pytest tests/pipelines`` and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from quick_settings import FAST

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "dad_pipeline.py"
GOLDEN = Path(__file__).parent / "golden" / "dad_pipeline.golden.yaml"  # .gitignore drops dad_pipeline.yaml
STEPS = (
    "prepare-data",
    "finetune-teacher",
    "train-vqgan",
    "cache-teacher",
    "collect-teacher-cache",
    "train-student",
    "evaluate-ood",
    "register-model",
)


def _run(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "dad_pipeline.yaml"
    result = _run("--compile", "--output", str(path))
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def spec(compiled) -> tuple[dict, dict]:
    pipeline, platform_spec = yaml.safe_load_all(compiled.read_text())
    return pipeline, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def platform():
    from pipelines import platform

    return platform


def _tasks(pipeline: dict) -> dict[str, dict]:
    """Every task of every DAG (root, conditions, loops), by task name."""
    dags = [pipeline["root"]["dag"], *(c["dag"] for c in pipeline["components"].values() if "dag" in c)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def _executor(pipeline: dict, task: dict) -> str:
    return pipeline["components"][task["componentRef"]["name"]]["executorLabel"]


def _parameter(ref: dict) -> str:
    """The pipeline parameter a platform setting reads (nested DAGs see it as ``pipelinechannel--<name>``)."""
    return ref["componentInputParameter"].removeprefix("pipelinechannel--")


def _by_display_name(pipeline: dict) -> dict[str, dict]:
    return {task["taskInfo"]["name"]: task for task in _tasks(pipeline).values()}


def test_compiling_twice_gives_the_same_bytes(compiled, tmp_path):
    again = tmp_path / "again.yaml"
    assert _run("--compile", "--output", str(again)).returncode == 0
    assert again.read_bytes() == compiled.read_bytes()


def test_golden_spec(compiled):
    """The committed spec, minus the SDK version line; ``UPDATE_GOLDEN=1`` rewrites it."""

    def strip(text: str) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("sdkVersion:"))

    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(compiled.read_text())
    assert GOLDEN.is_file(), "no golden spec yet: run UPDATE_GOLDEN=1 pytest tests/pipelines"
    assert strip(compiled.read_text()) == strip(GOLDEN.read_text()), (
        "the compiled pipeline differs from tests/pipelines/golden/dad_pipeline.golden.yaml; if that is intended, "
        "rewrite it with UPDATE_GOLDEN=1 pytest tests/pipelines and review the diff"
    )


def test_every_step_is_there(spec):
    pipeline, _ = spec
    names = {name.rstrip("-0123456789") for name in _tasks(pipeline)}
    assert set(STEPS) <= names
    displayed = _by_display_name(pipeline)
    assert {
        "train-student",
        "train-student-launcher",
        "import-teacher",
        "import-vqgan",
        "import-student",
        "use-teacher-checkpoint",
        "use-vqgan-checkpoint",
    } <= set(displayed)


def test_cache_workers_are_a_parallel_for_over_shard_indices(spec):
    pipeline, _ = spec
    loops = [task for task in _tasks(pipeline).values() if "parameterIterator" in task]
    (loop,) = loops
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("shard-indices-Output")
    body = pipeline["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(body) == ["cache-teacher", "config-overrides-2"]  # kfp.local: the overrides are merged in the loop
    assert body["cache-teacher"]["inputs"]["parameters"]["params"]["taskOutputParameter"]["producerTask"] == (
        "config-overrides-2"
    )
    cache_dir = body["cache-teacher"]["inputs"]["parameters"]["cache_dir"]["runtimeValue"]["constant"]
    assert "{{$.pipeline_job_uuid}}" in cache_dir  # one cache folder per run, shared by the workers
    collect = _tasks(pipeline)["collect-teacher-cache"]
    assert collect["inputs"]["parameters"]["worker_reports"]["taskOutputParameter"]["producerTask"] == "for-loop-7"


def test_checkpoints_and_the_training_backend_are_conditions(spec):
    pipeline, _ = spec
    conditions = {
        task["taskInfo"]["name"]: task["triggerPolicy"]["condition"]
        for task in _tasks(pipeline).values()
        if "triggerPolicy" in task
    }
    assert conditions["no-teacher-checkpoint"] == "inputs.parameter_values['pipelinechannel--teacher_checkpoint'] == ''"
    assert conditions["teacher-checkpoint-given"].startswith("!(")
    assert conditions["no-vqgan-checkpoint"] == "inputs.parameter_values['pipelinechannel--vqgan_checkpoint'] == ''"
    assert (
        conditions["train-on-kubeflow-trainer"] == "inputs.parameter_values['pipelinechannel--backend'] == 'kubernetes'"
    )
    assert conditions["train-in-step"].startswith("!(")


def test_gpus_go_to_the_training_step_not_to_the_launcher(spec):
    pipeline, executors = spec
    displayed = _by_display_name(pipeline)
    containers = pipeline["deploymentSpec"]["executors"]
    in_step = containers[_executor(pipeline, displayed["train-student"])]["container"]
    accelerator = in_step["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    launcher = _executor(pipeline, displayed["train-student-launcher"])
    assert "accelerator" not in containers[launcher]["container"]["resources"]
    assert "tolerations" not in executors[launcher] and "nodeSelector" not in executors[launcher]
    for step in ("finetune-teacher", "train-vqgan", "cache-teacher", "evaluate-ood"):
        resources = containers[_executor(pipeline, displayed[step])]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"


def test_platform_settings_use_the_names_k8s_creates(spec, platform):
    pipeline, executors = spec
    defaults = {name: p.get("defaultValue") for name, p in pipeline["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["datasets_pvc"] == platform.DATASETS_PVC and defaults["cache_pvc"] == platform.CACHE_PVC
    assert defaults["s3_secret"] == platform.S3_SECRET and defaults["namespace"] == platform.NAMESPACE
    assert defaults["mlflow_tracking_uri"] == platform.MLFLOW_TRACKING_URI
    assert defaults["training_runtime"] == platform.TRAINING_RUNTIME
    displayed = _by_display_name(pipeline)

    def settings(step: str) -> dict:
        return executors[_executor(pipeline, displayed[step])]

    key, value = platform.CLIENT_POD_LABEL
    component_tasks = [
        t
        for t in _tasks(pipeline).values()
        if "executorLabel" in pipeline["components"].get(t["componentRef"]["name"], {})
        and not t["taskInfo"]["name"].startswith("import-")
    ]
    assert len(component_tasks) >= 11
    for task in component_tasks:
        assert executors[_executor(pipeline, task)]["podMetadata"]["labels"] == {key: value}
    for step in ("prepare-data", "train-student", "train-student-launcher", "register-model"):
        (secret,) = [s for s in settings(step)["secretAsEnv"] if _parameter(s["secretNameParameter"]) == "s3_secret"]
        assert [k["secretKey"] for k in secret["keyToEnv"]] == list(platform.S3_SECRET_KEYS)

    def mounts(step: str) -> dict[str, str]:
        return {_parameter(m["pvcNameParameter"]): m["mountPath"] for m in settings(step)["pvcMount"]}

    # The datasets volume wherever images are read (a folder or DVC dataset is read in place), the cache volume
    # wherever the teacher cache is written or read.
    datasets = {"datasets_pvc": "/mnt/datasets"}
    assert defaults["datasets_dir"] == "/mnt/datasets" and defaults["workdir"] == "/mnt/dad-work"
    for step in ("prepare-data", "finetune-teacher", "train-vqgan", "evaluate-ood"):
        assert mounts(step) == datasets
    for step in ("cache-teacher", "train-student"):
        assert mounts(step) == {**datasets, "cache_pvc": "/mnt/dad-work"}
    for step in ("collect-teacher-cache", "train-student-launcher"):  # the job's pods mount both (launch.py)
        assert mounts(step) == {"cache_pvc": "/mnt/dad-work"}
    for step in ("train-student", "finetune-teacher", "train-vqgan", "cache-teacher", "evaluate-ood"):
        (toleration,) = settings(step)["tolerations"]
        assert _parameter(toleration["tolerationJson"]) == "gpu_tolerations"
        assert _parameter(settings(step)["nodeSelector"]["nodeSelectorJson"]) == "gpu_node_selector"
    assert defaults["gpu_tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def test_every_step_is_sized_and_runs_as_the_image_user(spec, platform):
    from pipelines.dad_pipeline import STEP_RESOURCES

    pipeline, executors = spec
    containers = pipeline["deploymentSpec"]["executors"]
    steps = {label: e["container"] for label, e in containers.items() if "container" in e}
    assert len(steps) >= 11
    for label, container in steps.items():
        resources = container.get("resources", {})
        for field in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(field), (label, field)
        uid = str(platform.RUN_AS_USER)
        assert executors[label]["securityContext"] == {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": True}
    displayed = _by_display_name(pipeline)

    def resources(step: str) -> dict:
        return containers[_executor(pipeline, displayed[step])]["container"]["resources"]

    sizes = {
        "prepare-data": "data",
        "train-student-launcher": "light",
        "register-model": "light",
        "evaluate-ood": "gpu",
        "cache-teacher": "gpu",
        "train-student": "train",
    }
    for step, size in sizes.items():
        (cpu_request, cpu_limit), (memory_request, memory_limit) = STEP_RESOURCES[size].values()
        assert resources(step)["resourceCpuLimit"] == cpu_limit, step
        assert resources(step)["resourceCpuRequest"] == cpu_request, step
        assert resources(step)["resourceMemoryLimit"] == memory_limit, step
        assert resources(step)["resourceMemoryRequest"] == memory_request, step
    # GPU training gets more than any single-GPU step, which gets more than bookkeeping.
    gib = {size: int(r["memory"][1].removesuffix("Gi")) for size, r in STEP_RESOURCES.items()}
    assert gib["train"] > gib["gpu"] > gib["light"]


def test_mlflow_clients_get_the_optional_mlflow_credentials(spec, platform):
    pipeline, executors = spec
    defaults = {name: p.get("defaultValue") for name, p in pipeline["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["mlflow_secret"] == platform.MLFLOW_SECRET
    displayed = _by_display_name(pipeline)
    tracked = ("prepare-data", "finetune-teacher", "train-vqgan", "cache-teacher", "train-student")
    for step in (*tracked, "train-student-launcher", "evaluate-ood", "register-model"):  # each logs into MLflow
        secrets = executors[_executor(pipeline, displayed[step])]["secretAsEnv"]
        (mlflow,) = [s for s in secrets if _parameter(s["secretNameParameter"]) == "mlflow_secret"]
        assert mlflow["optional"] is True  # dev has no such Secret and no login
        assert [k["secretKey"] for k in mlflow["keyToEnv"]] == list(platform.MLFLOW_SECRET_KEYS)
        assert [k["envVar"] for k in mlflow["keyToEnv"]] == list(platform.MLFLOW_SECRET_KEYS)
    for step in ("collect-teacher-cache", "shard-indices"):
        secrets = executors[_executor(pipeline, displayed[step])].get("secretAsEnv", [])
        assert all(_parameter(s["secretNameParameter"]) != "mlflow_secret" for s in secrets), step


def test_the_training_job_gets_the_cluster_names(spec, platform):
    from components._image import DAD_IMAGE

    pipeline, _ = spec
    launcher = _by_display_name(pipeline)["train-student-launcher"]["inputs"]["parameters"]
    assert launcher["job"]["runtimeValue"]["constant"] == {
        "image": DAD_IMAGE,
        "namespace": "{{$.inputs.parameters['pipelinechannel--namespace']}}",
        "runtime": "{{$.inputs.parameters['pipelinechannel--training_runtime']}}",
    }
    assert launcher["mounts"]["runtimeValue"]["constant"] == {
        "/mnt/datasets": "{{$.inputs.parameters['pipelinechannel--datasets_pvc']}}",
        "/mnt/dad-work": "{{$.inputs.parameters['pipelinechannel--cache_pvc']}}",
    }


def test_every_step_runs_the_project_image(spec):
    from components._image import DAD_IMAGE

    pipeline, _ = spec
    containers = [e["container"] for e in pipeline["deploymentSpec"]["executors"].values() if "container" in e]
    assert len(containers) >= 11
    for container in containers:
        assert container["image"] == DAD_IMAGE
        assert "pip install" not in " ".join(container["command"])  # install_kfp_package=False, no packages


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_image_is_chosen_at_compile_time(tmp_path, how):
    """``--image`` or ``DAD_IMAGE`` sets every step's image and the training job's, recorded in the spec."""
    image, path = "registry.internal:5000/dad:candidate", tmp_path / "spec.yaml"
    env = (
        {**os.environ, "DAD_IMAGE": image}
        if how == "environment"
        else {k: v for k, v in os.environ.items() if k != "DAD_IMAGE"}
    )
    args = [sys.executable, str(SCRIPT), "--compile", "--output", str(path)] + (
        ["--image", image] if how == "flag" else []
    )
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 0, result.stderr
    pipeline = next(yaml.safe_load_all(path.read_text()))
    images = {e["container"]["image"] for e in pipeline["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {image}
    launcher = _by_display_name(pipeline)["train-student-launcher"]["inputs"]["parameters"]
    assert launcher["job"]["runtimeValue"]["constant"]["image"] == image


def test_an_image_flag_after_the_components_were_imported_is_refused(capsys):
    from pipelines import dad_pipeline

    assert dad_pipeline.main(["--compile", "--image", "other/image:1", "--output", "unused.yaml"]) == 2
    assert "--image other/image:1: the components were imported with" in capsys.readouterr().err


def test_parse_params():
    from pipelines.dad_pipeline import UsageError, parse_params

    args = parse_params(
        [
            "num_shards=4",
            "train.epochs=2",
            'gpu_node_selector={"pool": "a100"}',
            "backend=local",
            'params=["loss.variant=C"]',
            "train.lr=0.1",
        ]
    )
    assert args == {
        "num_shards": 4,
        "gpu_node_selector": {"pool": "a100"},
        "backend": "local",
        "params": ["loss.variant=C", "train.epochs=2", "train.lr=0.1"],
    }
    with pytest.raises(UsageError, match="unknown pipeline parameter 'shards'; known: params, "):
        parse_params(["shards=2"])
    with pytest.raises(UsageError, match="num_shards=two"):
        parse_params(["num_shards=two"])
    with pytest.raises(UsageError, match="train.epoch"):
        parse_params(["train.epoch=2"])  # the config schema is checked before anything runs
    with pytest.raises(UsageError, match="not of the form"):
        parse_params(["num_shards"])


def test_typed_knobs_are_parameters_and_are_checked_against_the_schema():
    from pipelines.dad_pipeline import UsageError, parse_params

    args = parse_params(["epochs=3", "eps=0.05", "attack_mode=none", "student_model=resnet18", "train.lr=0.1"])
    assert args == {
        "epochs": 3,
        "eps": 0.05,
        "attack_mode": "none",
        "student_model": "resnet18",
        "params": ["train.lr=0.1"],
    }
    with pytest.raises(UsageError, match="attack.mode"):
        parse_params(["attack_mode=fgsm"])  # checked as the merged override list the steps get
    with pytest.raises(UsageError, match="eps=big"):
        parse_params(["eps=big"])


def test_every_step_gets_the_merged_overrides(spec):
    pipeline, _ = spec
    defaults = pipeline["root"]["inputDefinitions"]["parameters"]
    assert {
        k: defaults[k]["parameterType"] for k in ("student_model", "epochs", "attack_mode", "eps", "loss_variant")
    } == {
        "student_model": "STRING",
        "epochs": "NUMBER_INTEGER",
        "attack_mode": "STRING",
        "eps": "NUMBER_DOUBLE",
        "loss_variant": "STRING",
    }
    merge = _by_display_name(pipeline)["config-overrides"]["inputs"]["parameters"]
    assert merge["params"] == {"componentInputParameter": "params"}
    assert merge["epochs"] == {"componentInputParameter": "epochs"}
    for name, task in _by_display_name(pipeline).items():
        given = task.get("inputs", {}).get("parameters", {}).get("params")
        if given is not None and not name.endswith("config-overrides"):  # the merging steps get the raw list
            assert "config-overrides" in str(given), name


def test_resuming_steps_retry_and_steps_on_mutable_inputs_are_not_cached(spec):
    from pipelines.dad_pipeline import RETRIES

    pipeline, _ = spec
    displayed = _by_display_name(pipeline)
    for step in ("cache-teacher", "train-student", "train-student-launcher", "evaluate-ood"):
        assert displayed[step]["retryPolicy"]["maxRetryCount"] == RETRIES, step
        assert displayed[step]["retryPolicy"]["backoffDuration"] == "60s", step
    for step in ("prepare-data", "use-teacher-checkpoint", "use-vqgan-checkpoint", "register-model"):
        assert not displayed[step]["cachingOptions"].get("enableCache"), step
        assert "retryPolicy" not in displayed[step], step
    assert displayed["finetune-teacher"]["cachingOptions"]["enableCache"] is True


def test_local_mlflow_uri_env_then_config_then_a_local_file(tmp_path, monkeypatch):
    from pipelines.dad_pipeline import local_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert local_tracking_uri([]) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: http://from-params:5000\n")
    assert local_tracking_uri([]) == "http://from-params:5000"
    assert local_tracking_uri(["tracking.uri=http://from-override:5000"]) == "http://from-override:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert local_tracking_uri(["tracking.uri=http://from-override:5000"]) == "http://from-env:5000"


def test_local_steps_are_shown_by_their_display_names():
    from pipelines.dad_pipeline import _display_names, dad_pipeline

    names = _display_names(dad_pipeline)
    assert names["importer-2"] == "import-vqgan" and names["train-student-2"] == "train-student"
    assert names["use-checkpoint"] == "use-teacher-checkpoint" and names["prepare-data"] == "prepare-data"


def test_compile_applies_parameter_values(tmp_path):
    path = tmp_path / "p.yaml"
    assert (
        _run(
            "--compile", "--output", str(path), "--param", "num_shards=8", "--param", "train.epochs=3", cwd=tmp_path
        ).returncode
        == 0
    )  # runs from any folder
    pipeline = next(yaml.safe_load_all(path.read_text()))
    defaults = pipeline["root"]["inputDefinitions"]["parameters"]
    assert defaults["num_shards"]["defaultValue"] == 8
    assert defaults["params"]["defaultValue"] == ["train.epochs=3"]


def test_unknown_param_is_a_one_line_error(tmp_path):
    result = _run("--compile", "--output", str(tmp_path / "x.yaml"), "--param", "x=1")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown pipeline parameter 'x'; known: params, student_model")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_submit_to_a_closed_port_fails_fast():
    from servers import free_port

    start = time.monotonic()
    result = _run("--submit", "--host", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot reach Kubeflow Pipelines at http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_local_run_trains_evaluates_and_registers(tmp_path, mlflow_sqlite_uri):
    """The whole pipeline under kfp.local: 2 cache workers, torchrun with 2 processes, MLflow in SQLite."""
    import mlflow

    params = [arg for item in FAST for arg in ("--param", item)]
    result = _run(
        "--local",
        "--output-dir",
        str(tmp_path / "out"),
        "--param",
        f"mlflow_tracking_uri={mlflow_sqlite_uri}",
        *params,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "registered model: models:/dad-student/1" in result.stdout
    assert f"mlflow ui --backend-store-uri {mlflow_sqlite_uri}" in result.stdout

    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    report = yaml.safe_load((run_dir / "evaluate-ood" / "evaluation" / "eval_report.json").read_text())
    assert {"clean_top1", "ood_mean_top1"} <= set(report)
    assert (run_dir / "evaluate-ood" / "report").read_text().strip()
    caches = list((tmp_path / "out" / "work" / "cache").iterdir())
    assert len(caches) == 1 and sorted(p.name for p in caches[0].glob("report-*.json")) == [
        "report-0.json",
        "report-1.json",
    ]

    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dad"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    runs = {r.data.tags.get("dad.run_kind"): r for r in client.search_runs([experiment.experiment_id])}
    parent, training = runs.pop("pipeline"), runs["train-student"]
    assert parent.info.status == "FINISHED" and parent.data.params["train.epochs"] == "1"
    assert set(runs) == {"finetune-teacher", "train-vqgan", "cache-teacher", "train-student"}  # one child per step
    for child in client.search_runs([experiment.experiment_id], "tags.`dad.run_kind` != 'pipeline'"):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["dad.pipeline_run_id"] == parent.data.tags["dad.pipeline_run_id"]
    assert training.info.status == "FINISHED" and training.info.run_name == "train-student resnet10t dad"
    assert training.data.params["train.epochs"] == "1" and "val_top1" in training.data.metrics
    manifest = json.loads((run_dir / "prepare-data" / "dataset" / "manifest.json").read_text())
    assert [d.dataset.digest for d in training.inputs.dataset_inputs] == [manifest["dataset_hash"][:36]]
    assert training.data.tags["dad.teacher"].startswith("dad-tiny-clip:sha256:")
    assert runs["train-vqgan"].data.metrics["vqgan/psnr_db"] > 0
    assert "teacher/zero_shot_top1" in runs["finetune-teacher"].data.metrics
    assert training.data.metrics["eval/ood_mean_top1"] == pytest.approx(report["ood_mean_top1"])
    assert {"dad.dataset_hash", "dad.cache_hash", "dad.teacher", "dad.git_sha"} <= set(training.data.tags)
    assert {"config.yaml", "report.json", "model"} <= {a.path for a in client.list_artifacts(training.info.run_id)}
    version = client.get_model_version_by_alias("dad-student", "champion")
    assert set(version.aliases) == {"challenger", "champion"} and str(version.version) == "1"
    assert version.run_id == training.info.run_id  # registered from the training run
    assert "| digits-c |" in version.description  # the evaluation table
    tag = version.tags["dad.metric.ood_mean_top1"]  # rounded: 9.76, not 9.760000000000002
    assert float(tag) == pytest.approx(report["ood_mean_top1"], abs=1e-4) and len(tag.partition(".")[2]) <= 4
    mlflow.set_tracking_uri(mlflow_sqlite_uri)
    import numpy as np

    from dad_core.mlflow_model import load_student_model

    model = load_student_model("models:/dad-student@champion")
    assert sum(p.numel() for p in model.parameters()) > 0
    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    predicted = mlflow.pyfunc.load_model("models:/dad-student@champion").predict(images)
    assert list(predicted.columns) == ["label", "class_id", "class_name", "probability"]


@pytest.mark.parametrize("item", ["mlflow_tracking_uri=http://u:SECRETPW@mlflow:5000", "tracking.uri=http://t@h:1"])
def test_a_tracking_uri_with_credentials_is_refused_as_a_pipeline_parameter(item):
    from pipelines.dad_pipeline import UsageError, parse_params

    with pytest.raises(UsageError, match=r"must not carry credentials \(http://\*\*\*@") as info:
        parse_params([item])
    assert "SECRETPW" not in str(info.value)
