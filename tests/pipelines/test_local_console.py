"""The console of ``--local``: one line per step, a log file per step, the summary table, under a real ``kfp.local``.

No ``from __future__ import annotations``: KFP reads the components' annotations as types.
"""

import io
import sys
import threading
from pathlib import Path

import pytest
from kfp import dsl, local

from pipelines.local_console import StepConsole, key_number


def test_key_number_picks_the_first_known_key():
    outputs = "metrics: Metrics( metadata={'student_val_top1': 80.44} )\n student: {'images_per_s': 12.0}"
    assert key_number(outputs) == "val top-1 80.4%"
    assert key_number("""Output: '{"images_per_s": 321.5, "shards": 2}'""") == "322 images/s"
    assert key_number("registration: Artifact( metadata={'version': '3', 'name': 'x'} )") == "version 3"
    assert key_number("Output: 'models:/x/1'") == ""


def _kfp_lines(name: str, body: list[str], outputs: str) -> list[str]:
    """What kfp.local prints for one task (colours included)."""
    return [
        f"17:00:00.000 - INFO - Executing task \x1b[96m'{name}'\x1b[0m",
        "17:00:00.001 - INFO - Streamed logs:\n",
        *[f"    {line}" for line in body],
        f"17:00:01.000 - INFO - Task \x1b[96m'{name}'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
        f"17:00:01.001 - INFO - Task \x1b[96m'{name}'\x1b[0m outputs:\n    {outputs}",
        "-" * 80,
    ]


def test_lines_of_parallel_tasks_go_to_their_own_logs(tmp_path):
    terminal = io.StringIO()
    tasks = {
        "cache-teacher-iteration-0": (["shard 0 done"] * 50, """Output: '{"images_per_s": 100.0}'"""),
        "cache-teacher-iteration-1": (["shard 1 done"] * 50, """Output: '{"images_per_s": 200.0}'"""),
    }
    with StepConsole(tmp_path / "logs", terminal=terminal) as console:

        def run(name: str) -> None:
            for line in _kfp_lines(name, *tasks[name]):
                print(line)  # sys.stdout is the console now, as it is for kfp.local's threads

        threads = [threading.Thread(target=run, args=(name,)) for name in tasks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("a line of no task")
    assert sys.stdout is not console
    lines = terminal.getvalue().splitlines()
    assert sorted(line.split()[1] for line in lines) == sorted(tasks)
    assert all(line.startswith("✓ ") for line in lines)
    assert {line.split()[-2] for line in lines} == {"100", "200"}  # "100 images/s"
    for index in (0, 1):
        log = (tmp_path / "logs" / f"cache-teacher-iteration-{index}.log").read_text()
        assert log.count(f"shard {index} done") == 50 and f"shard {1 - index}" not in log
    everything = (tmp_path / "logs" / "pipeline.log").read_text()
    assert everything.count("done") == 100 and "a line of no task" in everything
    table = console.summary().splitlines()
    assert table[0].split() == ["step", "time", "result", "log"] and len(table) == 3


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def noisy(n: int, metrics: dsl.Output[dsl.Metrics]) -> int:
    for i in range(n):
        print(f"noisy line {i}")
    metrics.log_metric("student_val_top1", 81.25)
    return n


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fails(n: int):
    raise ValueError(f"no good: {n}")


@dsl.pipeline(name="console-ok")
def _ok_pipeline(n: int = 30):
    noisy(n=n)


@dsl.pipeline(name="console-fails")
def _failing_pipeline(n: int = 3):
    fails(n=noisy(n=n).outputs["Output"])


@pytest.mark.integration
def test_a_real_kfp_local_run_prints_one_line_per_step(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"))
    terminal = io.StringIO()
    with StepConsole(tmp_path / "logs", terminal=terminal, names={"noisy": "noisy-step"}):
        _ok_pipeline(n=30)
    (line,) = terminal.getvalue().splitlines()
    assert line.startswith("✓ noisy-step ") and line.endswith("val top-1 81.2%")  # shown by its display name
    log = (tmp_path / "logs" / "noisy-step.log").read_text()
    assert log.count("noisy line") == 30 and "\x1b[" not in log
    assert "noisy line 29" in (tmp_path / "logs" / "pipeline.log").read_text()

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"), raise_on_error=True)
    terminal = io.StringIO()
    console = StepConsole(tmp_path / "logs2", terminal=terminal)
    with pytest.raises(RuntimeError), console:
        _failing_pipeline()
    assert [line[:7] for line in terminal.getvalue().splitlines()] == ["✓ noisy", "✗ fails"]
    assert console.failed().name == "fails"
    assert "ValueError: no good: 3" in Path(console.failed().log).read_text()
