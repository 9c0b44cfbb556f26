"""The console of a ``kfp.local`` run: one line per step, each step's full log in a file, a summary table at the end.

``kfp.local`` prints everything to ``sys.stdout`` from the thread that runs the task: its own status lines
(``Executing task 'x'``, ``Task 'x' finished with status SUCCESS``, the outputs with their metadata) and every line
of the step's subprocess. :class:`StepConsole` takes the place of ``sys.stdout``/``sys.stderr`` (and of file
descriptors 1 and 2, for anything written below Python) while the pipeline runs: every line goes to
``pipeline.log``, each task's lines, told apart by the thread that writes them, to ``<task>.log``, and the terminal
gets one line per finished step with its duration and key number::

    ✓ train-student              2m13s  val top-1 80.4%
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = ["Step", "StepConsole", "key_number", "plain"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_NUMBER = re.compile(r"""['"](\w+)['"]: ['"]?(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\b(?![.\w])""")
_RULE = re.compile(r"^\s*-{20,}\s*$")  # kfp.local's horizontal line after each task
# The number that sums a step up: the first of these keys in the task's printed outputs (artifact metadata, metrics,
# a JSON report returned as a string).
KEY_NUMBERS = (
    ("student_val_top1", "val top-1 {:.1f}%"),
    ("ood_mean_top1", "OOD mean top-1 {:.1f}%"),
    ("teacher_val_top1", "teacher val top-1 {:.1f}%"),
    ("vqgan_psnr_db", "PSNR {:.1f} dB"),
    ("num_samples", "{:.0f} cached samples"),
    ("images_per_s", "{:.0f} images/s"),
    ("train", "{:.0f} train images"),
    ("version", "version {:.0f}"),
)


def plain(text: str) -> str:
    """``text`` without the colour codes kfp.local puts in its messages."""
    return _ANSI.sub("", text)


def key_number(text: str) -> str:
    """The step's key number, formatted, from its printed outputs; empty when none of :data:`KEY_NUMBERS` is there."""
    found: dict[str, float] = {}
    for key, value in _NUMBER.findall(text):
        found.setdefault(key, float(value))
    return next((fmt.format(found[key]) for key, fmt in KEY_NUMBERS if key in found), "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Step:
    """One task of the run, as its log tells it."""

    name: str
    log: Path
    start: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    status: str = "RUNNING"
    outputs: list[str] = field(default_factory=list)
    result: str = ""

    @property
    def mark(self) -> str:
        return {"SUCCESS": "✓", "FAILURE": "✗"}.get(self.status, "…")

    def line(self) -> str:
        took = _duration(self.seconds if self.seconds is not None else time.monotonic() - self.start)
        return f"{self.mark} {self.name:<28} {took:>6}  {self.result}".rstrip()


class StepConsole:
    """A ``sys.stdout`` for the duration of a ``kfp.local`` run; see the module docstring.

    Args:
        log_dir: gets ``pipeline.log`` (everything) and ``<task>.log`` per task.
        terminal: where the one-line summaries go (default: the real standard output).
        names: the name to show for a task that ``kfp.local`` names after its component (``importer-2``): its
            display name (``import-vqgan``).
    """

    def __init__(self, log_dir: Path, terminal: TextIO | None = None, names: Mapping[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.names = dict(names or {})
        self.steps: list[Step] = []
        self._terminal = terminal
        self._current: dict[int, Step] = {}  # thread -> the step it runs
        self._partial: dict[int, str] = {}
        self._files: dict[str, TextIO] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- file-like interface (sys.stdout)
    def write(self, text: str) -> int:
        with self._lock:
            thread = threading.get_ident()
            lines = (self._partial.pop(thread, "") + text).split("\n")
            if lines[-1]:
                self._partial[thread] = lines[-1]
            for line in lines[:-1]:
                self._line(thread, line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._files["pipeline.log"].fileno()

    # ---------------------------------------------------------------- context
    def __enter__(self) -> StepConsole:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        if self._terminal is None:
            self._terminal = os.fdopen(os.dup(self._saved_fds[0]), "w", buffering=1, encoding="utf-8")
        self._files["pipeline.log"] = open(self.log_dir / "pipeline.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        for fd in (1, 2):  # a child's or a C library's output, written below Python, lands in the full log too
            os.dup2(self._files["pipeline.log"].fileno(), fd)
        self._saved_streams = (sys.stdout, sys.stderr)
        self._print = builtins.print  # kfp.local indents print() per task; parallel tasks can leave it indented
        sys.stdout = sys.stderr = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._saved_streams
        builtins.print = self._print
        for thread, rest in list(self._partial.items()):
            self._line(thread, rest)
        self.flush()
        for fd, saved in zip((1, 2), self._saved_fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        for step in self.steps:  # a step cut short by a failure elsewhere
            if step.seconds is None:
                step.seconds = time.monotonic() - step.start
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # ---------------------------------------------------------------- parsing
    def _line(self, thread: int, raw: str) -> None:
        self._files["pipeline.log"].write(raw + "\n")
        text = _ANSI.sub("", raw)
        if match := _START.search(text):
            self._current[thread] = self._start(match.group(1))
        step = self._current.get(thread)
        if step is None:
            return
        self._files[step.log.name].write(text + "\n")
        if match := _END.search(text):
            step.seconds, step.status = time.monotonic() - step.start, match.group(2)
            if step.status != "SUCCESS":
                self._finish(thread, step)
        elif step.seconds is not None:
            if _RULE.match(text):
                self._finish(thread, step)
            else:
                step.outputs.append(text)

    def _start(self, name: str) -> Step:
        name = self.names.get(name, name)
        taken = {s.log.name for s in self.steps}
        log = self.log_dir / f"{name}.log"
        for n in range(2, 1000):
            if log.name not in taken:
                break
            log = self.log_dir / f"{name}-{n}.log"
        self._files[log.name] = open(log, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        step = Step(name=name, log=log)
        self.steps.append(step)
        return step

    def _finish(self, thread: int, step: Step) -> None:
        step.result = key_number("\n".join(step.outputs))
        self._current.pop(thread, None)
        self._files.pop(step.log.name).close()
        self.say(step.line())

    def say(self, text: str) -> None:
        """A line on the terminal."""
        assert self._terminal is not None
        self._terminal.write(text + "\n")
        self._terminal.flush()

    def failed(self) -> Step | None:
        """The first step that failed, if any."""
        return next((s for s in self.steps if s.status == "FAILURE"), None)

    def summary(self) -> str:
        """The table of every step: status, duration, key number, log file."""
        rows = [("", "step", "time", "result", "log")]
        for s in self.steps:
            rows.append((s.mark, s.name, _duration(s.seconds or 0.0), s.result or "-", s.log.name))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
            for row in rows
        )
