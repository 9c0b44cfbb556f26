"""What a person sees in the MLflow UI after a pipeline run: a real ``mlflow server``, a real Chromium.

One small ``--local`` pipeline run (about 2 minutes on two cores) logs into the session's ``mlflow_server`` under an
experiment and a registered model of its own. The tests then ask MLflow (``MlflowClient``) what the UI should show and
check that the UI shows it: the experiment in the model-training view, the pipeline's parent run with its step
children, the registered version's link to its source run, the training run's ``val_top1`` chart and its evaluation
image. Each test takes a full-page screenshot; with ``DAD_UPDATE_SCREENSHOTS=1`` they replace the ones in
``docs/images/`` that README.md shows (else they go to the test's tmp folder, so a test run leaves the repo clean).

The UI is MLflow 3.17.2's React app: hash routes (``#/experiments/<id>/runs/<run id>``), an ag-grid runs table. The
selectors are the app's visible texts and links where possible; the few others are named in the constants below.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINE_TIMEOUT_S = 1200  # about 2 minutes on two idle cores
# The first test's set-up runs the pipeline: give it more than the suite's 900 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(PIPELINE_TIMEOUT_S + 300)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "dad_pipeline.py"
DOCS_IMAGES = REPO / "docs" / "images"
EXPERIMENT = "dad-ui"
MODEL = "ui-student"
METRIC = "val_top1"
EVAL_IMAGE = "evaluation/accuracy.png"  # dad_core.evaluate.REPORT_PNG, logged by evaluate-ood into the training run
STEP_KINDS = ("finetune-teacher", "train-vqgan", "cache-teacher", "train-student")  # prepare-data opens the parent
# As tests/pipelines/test_pipeline.py's FAST, with two training epochs: val_top1 at steps 1 and 2, a line, not a dot.
FAST = (
    "finetune.epochs=1",
    "vqgan.train.epochs=1",
    "train.epochs=2",
    "data.val_fraction=0.75",
    "data.suite_per_class=5",
    "cache.views=1",
)
# MLflow 3.17.2 chooses GenAI vs model training from the browser (local storage "mlflow.workflowType", default GenAI)
# or from this URL parameter; the experiment's mlflow.experimentKind tag is not consulted while the switch is shown.
TRAINING_VIEW = "workflowType=machine_learning"
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'  # the assistant panel that opens once
EXPAND_RUN = 'button[data-component-id*="runnamecellrenderer"]'  # the +/- before a parent run's name
CURVE_DRAWN = """grid => [...grid.querySelectorAll('.scatterlayer .trace')].some(trace =>
    trace.querySelectorAll('.points path.point').length >= 2
    || /[LC]/.test(trace.querySelector('path.js-line')?.getAttribute('d') || ''))"""


# --- the pipeline run and what MLflow holds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server, tmp_path_factory, browser) -> str:
    """Run the small pipeline into the session's MLflow server; returns its stdout.

    Asks for ``browser`` first so that a missing Chromium fails at once, not after the run.
    """
    out = tmp_path_factory.mktemp("ui-pipeline")
    params = [arg for item in FAST for arg in ("--param", item)]
    command = [
        sys.executable,
        str(SCRIPT),
        "--local",
        "--output-dir",
        str(out),
        "--param",
        f"mlflow_tracking_uri={mlflow_server.uri}",
        "--param",
        f"model_name={MODEL}",
        "--param",
        f"tracking.experiment={EXPERIMENT}",
        *params,
    ]
    # Its own process group: on a timeout or an interrupt, the kfp.local step processes go with it.
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=PIPELINE_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, "the pipeline run failed:\n" + (result.stdout + result.stderr)[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def client(mlflow_server, pipeline_run):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


@pytest.fixture(scope="module")
def experiment(client):
    found = client.get_experiment_by_name(EXPERIMENT)
    assert found is not None, f"the pipeline logged no experiment {EXPERIMENT!r} (tracking.experiment)"
    return found


@pytest.fixture(scope="module")
def runs(client, experiment) -> list:
    found = client.search_runs([experiment.experiment_id], max_results=500)
    assert found, f"no runs in experiment {EXPERIMENT!r}"
    return found


def _describe(runs) -> str:
    return "; ".join(
        f"{r.info.run_name} ({r.info.run_id[:8]}, kind={r.data.tags.get('dad.run_kind')}, "
        f"parent={r.data.tags.get('mlflow.parentRunId', '-')[:8]})"
        for r in runs
    )


def _parent_and_children(runs, *, all_steps: bool = True):
    """The contract: one parent tagged dad.run_kind=pipeline; its step children point at it by mlflow.parentRunId."""
    parents = [r for r in runs if r.data.tags.get("dad.run_kind") == "pipeline"]
    assert len(parents) == 1, f"expected one run tagged dad.run_kind=pipeline; runs: {_describe(runs)}"
    (parent,) = parents
    pipeline_id = parent.data.tags.get("dad.pipeline_run_id")
    assert pipeline_id, "the parent run has no dad.pipeline_run_id tag"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    kinds = {r.data.tags.get("dad.run_kind") for r in children}
    assert children, f"the pipeline run has no child runs: {_describe(runs)}"
    assert not all_steps or set(STEP_KINDS) <= kinds, (
        f"children of the pipeline run lack kinds {set(STEP_KINDS) - kinds}: " + (_describe(runs))
    )
    assert all(r.data.tags.get("dad.pipeline_run_id") == pipeline_id for r in children), _describe(children)
    return parent, children


def _training_run(runs):
    """The train-student child (the contract); until it exists, the one run that logged val_top1 as a history."""
    tagged = [r for r in runs if r.data.tags.get("dad.run_kind") == "train-student"]
    if tagged:
        assert len(tagged) == 1, f"several train-student runs: {_describe(tagged)}"
        return tagged[0]
    logged = [r for r in runs if METRIC in r.data.metrics]
    assert len(logged) == 1, f"expected one run with {METRIC}; runs: {_describe(runs)}"
    return logged[0]


# --- the browser ----------------------------------------------------------------------------------------------------


def _open(page, base: str, route: str):
    """Go to ``<base>/#/<route>`` and wait for the app's shell (the sidebar's "Model registry"/"Experiments")."""
    page.goto(f"{base}/#/{route}")
    page.get_by_role("link", name="Experiments").or_(page.get_by_role("link", name="Model registry")).first.wait_for()
    return page


def _close_assistant(page) -> None:
    """The MLflow Assistant panel opens on a first visit and takes a third of the screen: close it if it is there."""
    close = page.locator(ASSISTANT_CLOSE)
    if close.count() and close.first.is_visible():
        close.first.click()
        close.first.wait_for(state="hidden")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Where the screenshots go: ``docs/images`` with ``DAD_UPDATE_SCREENSHOTS=1``, else a tmp folder."""
    return DOCS_IMAGES if os.environ.get("DAD_UPDATE_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("screenshots")


def _screenshot(page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _close_assistant(page)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _run_link(page, run_id: str):
    return page.locator(f'a[href*="/runs/{run_id}"]')


# --- the tests --------------------------------------------------------------------------------------------------------


def test_the_link_the_run_prints_opens_the_experiment_in_the_model_training_view(
    mlflow_server, experiment, pipeline_run, new_page
):
    """A first-time visitor following the link ``--local`` prints lands on the runs table, not on GenAI traces.

    MLflow 3.17.2 takes the view from the browser's local storage (default GenAI) or the link's ``workflowType``,
    not from the experiment's ``mlflow.experimentKind`` tag (set anyway, for versions that read it): the link the
    product prints names the training view.
    """
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development", experiment.tags
    (link,) = re.findall(r"MLflow UI:\s+(\S+)", pipeline_run)
    assert link == f"{mlflow_server.uri}/#/experiments/{experiment.experiment_id}/runs?{TRAINING_VIEW}", link
    page = new_page()
    page.goto(link)
    page.get_by_text(re.compile(r"^\d+ matching runs?$")).first.wait_for()
    assert TRAINING_VIEW in page.url, f"the experiment opened in the GenAI view ({page.url})"
    assert not page.get_by_text("Detect Issues").first.is_visible(), f"GenAI controls at {page.url}"


def test_the_runs_table_shows_the_pipeline_run_and_its_steps(mlflow_server, experiment, runs, new_page, images):
    parent, children = _parent_and_children(runs, all_steps=False)  # every step: checked last
    page = _open(new_page(), mlflow_server.uri, f"experiments/{experiment.experiment_id}/runs?{TRAINING_VIEW}")
    parent_link = _run_link(page, parent.info.run_id).first
    parent_link.wait_for()
    assert parent_link.inner_text().strip() == parent.info.run_name
    first_child = _run_link(page, children[0].info.run_id).first
    if not first_child.is_visible():  # collapsed: expand the parent row
        cell = page.locator('[role="gridcell"]', has=parent_link)
        cell.locator(EXPAND_RUN).first.click()
    for child in children:
        link = _run_link(page, child.info.run_id).first
        link.wait_for()
        # The cell may cut a long name short with an ellipsis: compare the link's text, not what is painted.
        assert link.inner_text().strip() == child.info.run_name, f"run {child.info.run_id} shown as {link.inner_text()}"
    _screenshot(page, images, "mlflow-experiment.png")
    _parent_and_children(runs)


def test_the_model_version_links_to_its_training_run(mlflow_server, client, runs, new_page, images):
    version = client.get_model_version(MODEL, "1")
    assert version.run_id, f"{MODEL} v1 has no source run"
    source = client.get_run(version.run_id)
    page = _open(new_page(), mlflow_server.uri, f"models/{MODEL}/versions/1?{TRAINING_VIEW}")
    page.get_by_text("Version 1", exact=True).first.wait_for()
    page.get_by_text("Source Run").first.wait_for()
    link = _run_link(page, version.run_id).first
    link.wait_for()
    assert version.run_id in (link.get_attribute("href") or "")
    assert link.inner_text().strip() == source.info.run_name
    _screenshot(page, images, "mlflow-model-version.png")
    _, children = _parent_and_children(runs)
    (training,) = [r for r in children if r.data.tags.get("dad.run_kind") == "train-student"]
    assert version.run_id == training.info.run_id, (
        f"{MODEL} v1 links to run {source.info.run_name} ({version.run_id}), not to the train-student run "
        f"{training.info.run_name} ({training.info.run_id})"
    )


def test_the_training_run_shows_a_val_top1_curve(mlflow_server, client, experiment, runs, new_page, images):
    training = _training_run(runs)
    route = f"experiments/{experiment.experiment_id}/runs/{training.info.run_id}/model-metrics?{TRAINING_VIEW}"
    page = _open(new_page(), mlflow_server.uri, route)
    page.get_by_role("heading", name=training.info.run_name).or_(
        page.get_by_text(training.info.run_name, exact=True)
    ).first.wait_for()
    grid = page.get_by_test_id("draggable-chart-cards-grid")
    grid.first.wait_for()
    # Charts below the fold render lazily and a run has many metrics (losses, eval/*): filter as a person would.
    page.get_by_placeholder("Search metric charts").fill(METRIC)
    # A chart card: its title, then its legend "<run name> (<metric>)".
    page.get_by_text(f"{training.info.run_name} ({METRIC})", exact=True).first.wait_for()
    assert grid.get_by_text(METRIC, exact=True).first.is_visible(), f"no {METRIC} chart at {page.url}"
    # ...and its Plotly trace is a line through at least two points (markers, or a path with a segment).
    page.wait_for_function(CURVE_DRAWN, arg=grid.first.element_handle())
    _screenshot(page, images, "mlflow-training-run.png")
    # A curve, not a dot: one point per epoch (train.epochs=2).
    history = client.get_metric_history(training.info.run_id, METRIC)
    steps = sorted(m.step for m in history)
    assert len(history) >= 2, f"{METRIC} of run {training.info.run_name} has {len(history)} point(s): steps {steps}"


def test_the_training_run_has_the_evaluation_chart(mlflow_server, client, experiment, runs, new_page, images):
    training = _training_run(runs)
    folder, name = EVAL_IMAGE.rsplit("/", 1)
    logged = [a.path for a in client.list_artifacts(training.info.run_id, folder)]
    assert EVAL_IMAGE in logged, f"run {training.info.run_name} has no {EVAL_IMAGE}; {folder}/ holds {logged}"
    route = f"experiments/{experiment.experiment_id}/runs/{training.info.run_id}/artifacts?{TRAINING_VIEW}"
    page = _open(new_page(), mlflow_server.uri, route)
    page.get_by_text(folder, exact=True).first.click()
    page.get_by_text(name, exact=True).first.click()
    image = page.locator(f'img[alt="{EVAL_IMAGE}"]')
    image.wait_for()
    # The preview is a decoded image, not a broken one.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    page.get_by_text(f"Path: mlflow-artifacts:/{experiment.experiment_id}/{training.info.run_id}/").first.wait_for()
    _screenshot(page, images, "mlflow-artifacts.png")
