"""The ablation pipeline: its spec (deterministic, a loop over the cells, the comparison), its command line, and a
tiny local run whose report must recompute from its own cells. Nothing here asserts which mode wins."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from quick_settings import FAST

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "ablation_pipeline.py"


def _run(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "ablation_pipeline.yaml"
    result = _run("--compile", "--output", str(path))
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def pipeline(compiled) -> dict:
    return next(yaml.safe_load_all(compiled.read_text()))


def _tasks(pipeline: dict) -> dict[str, dict]:
    dags = [pipeline["root"]["dag"], *(c["dag"] for c in pipeline["components"].values() if "dag" in c)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def test_compiling_twice_gives_the_same_bytes(compiled, tmp_path):
    again = tmp_path / "again.yaml"
    assert _run("--compile", "--output", str(again), cwd=tmp_path).returncode == 0
    assert again.read_bytes() == compiled.read_bytes()


def test_cells_are_a_parallel_for_then_one_comparison(pipeline):
    tasks = _tasks(pipeline)
    (loop,) = [task for task in tasks.values() if "parameterIterator" in task]
    assert loop["taskInfo"]["name"] == "cells"
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-ablation-Output")
    body = pipeline["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["run-ablation-cell"]
    cache_root = body["run-ablation-cell"]["inputs"]["parameters"]["cache_root"]["runtimeValue"]["constant"]
    assert "{{$.pipeline_job_uuid}}" in cache_root  # one cache folder per run
    compare = tasks["compare-ablation"]["inputs"]["parameters"]["cells"]["taskOutputParameter"]
    assert compare["producerTask"] == loop_name(pipeline, loop)
    assert {"prepare-data", "finetune-teacher", "train-vqgan", "plan-ablation"} <= set(tasks)
    outputs = pipeline["components"]["comp-compare-ablation"]["outputDefinitions"]["artifacts"]
    assert {name: o["artifactType"]["schemaTitle"] for name, o in outputs.items()} == {
        "comparison": "system.Artifact",
        "table": "system.Markdown",
        "chart": "system.HTML",
        "metrics": "system.Metrics",
    }


def loop_name(pipeline: dict, loop: dict) -> str:
    return next(name for name, task in pipeline["root"]["dag"]["tasks"].items() if task is loop)


def test_defaults_and_param_values(pipeline, tmp_path):
    defaults = {n: p.get("defaultValue") for n, p in pipeline["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["modes"] == "ce,kd,vq_only,random,dad" and defaults["seeds"] == "0,1"
    path = tmp_path / "p.yaml"
    args = ["--param", "seeds=0,1,2", "--param", "modes=ce,dad-latent,dad@attack.eps=3.0", "--param", "train.epochs=2"]
    assert _run("--compile", "--output", str(path), *args).returncode == 0
    parameters = next(yaml.safe_load_all(path.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert parameters["seeds"]["defaultValue"] == "0,1,2"
    assert parameters["modes"]["defaultValue"] == "ce,dad-latent,dad@attack.eps=3.0"
    assert parameters["params"]["defaultValue"] == ["train.epochs=2"]


def test_bad_modes_and_keys_are_one_line_errors(tmp_path, capsys):
    from pipelines.ablation_pipeline import main

    for param, message in (
        ("modes=ce,pgd", "error: --param: unknown ablation mode 'pgd'"),
        ("seeds=0,x", "error: --param: seeds must be integers"),
        ("train.epoch=2", "error: --param: unknown config key train.epoch"),
        ("num_shards=2", "error: unknown pipeline parameter 'num_shards'"),
    ):
        assert main(["--compile", "--output", str(tmp_path / "x.yaml"), "--param", param]) == 2, param
        stderr = capsys.readouterr().err
        assert stderr.startswith(message) and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x.yaml").exists()


def test_run_ablation_cell_hands_its_cell_to_the_library(tmp_path, monkeypatch):
    from kfp.dsl import Artifact, Dataset, Model

    import dad_core.ablation
    from components.ablation import run_ablation_cell

    calls = []

    def run_cell(mode, seed, **kwargs):
        calls.append((mode, seed, kwargs))
        return {"mode": mode, "seed": seed, "metrics": {"clean_top1": 90.0}, "survival": None}

    monkeypatch.setattr(dad_core.ablation, "run_cell", run_cell)
    result = Artifact(uri=str(tmp_path / "result"))
    teacher, vqgan = Model(uri=str(tmp_path / "t")), Model(uri=str(tmp_path / "v"))
    out = run_ablation_cell.python_func(
        dataset=Dataset(uri=str(tmp_path / "data")), teacher=teacher, vqgan=vqgan, cell={"mode": "dad@attack.eps=3",
        "seed": 1.0}, params=["train.epochs=1"], cache_root=str(tmp_path / "work"), nproc_per_node=2, result=result,
    )  # fmt: skip
    ((mode, seed, kwargs),) = calls
    assert (mode, seed) == ("dad@attack.eps=3", 1) and kwargs["params"] == ["train.epochs=1"]
    assert kwargs["cache_dir"] == tmp_path / "work" / "dad_attack.eps-3-s1" and kwargs["nproc_per_node"] == 2
    assert kwargs["teacher_checkpoint"] == Path(teacher.path) and kwargs["output_dir"] == Path(result.path)
    assert json.loads(out)["seed"] == 1 and result.metadata == {
        "mode": "dad@attack.eps=3",
        "seed": 1,
        "clean_top1": 90.0,
    }


def test_compare_ablation_writes_the_views_without_tracking(tmp_path):
    from kfp.dsl import HTML, Artifact, Markdown, Metrics

    from components.ablation import compare_ablation

    cells = [
        json.dumps({"mode": m, "seed": s, "metrics": {"digits-c_top1": v + s}, "survival": None})
        for m, v in (("ce", 50.0), ("kd", 53.0))
        for s in (0, 1)
    ]
    outputs = {
        "comparison": Artifact(uri=str(tmp_path / "comparison")),
        "table": Markdown(uri=str(tmp_path / "table")),
        "chart": HTML(uri=str(tmp_path / "chart")),
        "metrics": Metrics(uri=str(tmp_path / "metrics")),
    }
    compare_ablation.python_func(cells=cells, params=[], mlflow_tracking_uri="", **outputs)
    assert {p.name for p in (tmp_path / "comparison").iterdir()} == {
        "ablation_report.json",
        "ablation_report.md",
        "ablation.png",
        "ablation.html",
    }
    assert "| kd − ce | +3.00 ± 0.00 (2/2) |" in Path(outputs["table"].path).read_text()
    assert "data:image/png;base64," in Path(outputs["chart"].path).read_text()
    assert outputs["metrics"].metadata == {"kd-minus-ce/digits-c_top1": 3.0}


# The main pipeline's quick local setting (tests/quick_settings.py), one seed, three modes.
TINY = ("seeds=0", "modes=ce,kd,dad", *FAST)


@pytest.mark.integration
@pytest.mark.slow
def test_local_ablation_writes_a_report_that_recomputes_from_its_cells(tmp_path, mlflow_sqlite_uri):
    import mlflow

    out = tmp_path / "out"
    params = [arg for item in TINY for arg in ("--param", item)]
    result = _run("--local", "--output-dir", str(out), "--param", f"mlflow_tracking_uri={mlflow_sqlite_uri}", *params,
                  timeout=1800)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    report = json.loads((out / "ablation_report.json").read_text())
    assert [(c["mode"], c["seed"]) for c in report["cells"]] == [("ce", 0), ("kd", 0), ("dad", 0)]
    for cell in report["cells"]:
        assert {"clean_top1", "ood_mean_top1", "digits-c_top1"} <= set(cell["metrics"])
        assert (cell["survival"] is None) == (cell["mode"] in ("ce", "kd"))
    assert {"top1_clean", "top1_dad"} <= set(report["cells"][2]["survival"])
    assert report["metrics"] == ["digits-c_top1", "ood_mean_top1", "clean_top1"]
    assert [tuple(p) for p in report["pairs"]] == [("kd", "ce"), ("dad", "kd")]
    by = {(c["mode"], c["seed"]): c["metrics"] for c in report["cells"]}
    assert len(report["paired"]) == 2 * 3
    for row in report["paired"]:
        a, b = row["pair"]
        diffs = [by[a, s][row["metric"]] - by[b, s][row["metric"]] for s in report["seeds"]]
        assert row["mean"] == pytest.approx(statistics.fmean(diffs))
        assert row["std"] == 0.0 and row["n_pos"] + row["n_neg"] <= 1
    assert "| dad − kd |" in (out / "ablation_report.md").read_text()
    assert (out / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert not list((out / "work" / "ablation").glob("*/ce-s0"))  # ce caches nothing

    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dad"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["ablation"]
    assert {"ablation/ablation_report.json", "ablation/ablation_report.md", "ablation/ablation.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "ablation")
    }
    for name in ("ce-s0", "kd-s0", "dad-s0"):
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["seed"] == "0" and "ood_mean_top1" in child.data.metrics
    assert "survival/top1_dad" in runs["dad-s0"].data.metrics
