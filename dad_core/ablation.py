"""The ablation: does the attack help? Cells of modes x seeds, each cached, trained and evaluated; paired differences.

A *mode* says what the student learns from (:data:`MODES`):

* ``ce``: plain cross-entropy, no teacher and no cache (``loss.kd_weight=0``);
* ``kd``: distillation on clean images only (``attack.mode=none``);
* ``vq_only``: distillation on VQGAN round trips, no attack;
* ``random``: a random direction of the DAD budget instead of the teacher's gradient;
* ``dad``: the paper's DAD samples (VQ -> PGD on the teacher -> VQ);
* ``dad-latent``: DAD in the VQGAN's latent space (``attack.space=latent``);
* ``<mode>@key=value,key=value``: a custom cell, one of the above with extra overrides (``dad@attack.eps=3.0``).

Each cell trains with ``train.seed=<seed>`` (and caches with ``cache.seed=<seed>``). Comparisons are paired by seed:
for a pair ``(a, b)`` and a metric, the difference ``a - b`` is taken per seed, then summarized (mean, sample std,
how many seeds are positive or negative). Nothing here decides which mode wins.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_PAIRS",
    "MODES",
    "ablation_report",
    "cell_name",
    "cell_overrides",
    "cell_result",
    "default_metrics",
    "format_html",
    "format_markdown",
    "log_ablation",
    "paired_differences",
    "parse_mode",
    "plan_cells",
    "plot",
    "run_cell",
    "save_ablation",
    "uses_cache",
]

_PIXEL = ["attack.space=pixel"]
# Overrides of each base mode; they come after the run's own overrides, so they win over them.
MODES: dict[str, list[str]] = {
    "ce": ["loss.variant=A", "loss.kd_weight=0", "loss.kd_clean_weight=null", "loss.kd_adv_weight=null"],
    "kd": ["attack.mode=none"],
    "vq_only": ["attack.mode=vq_only", *_PIXEL],
    "random": ["attack.mode=random", *_PIXEL],
    "dad": ["attack.mode=dad", *_PIXEL],
    "dad-latent": ["attack.mode=dad", "attack.space=latent"],
}
DEFAULT_MODES = ("ce", "kd", "vq_only", "random", "dad")
# (a, b): the difference a - b. Pairs whose modes did not run are left out.
DEFAULT_PAIRS = (
    ("kd", "ce"),
    ("dad", "kd"),
    ("random", "kd"),
    ("vq_only", "kd"),
    ("dad", "random"),
    ("dad-latent", "random"),
    ("dad-latent", "dad"),
)
_NO_SURVIVAL = ("ce", "kd")  # no attack: their cells carry no survival diagnostics


def parse_mode(mode: str) -> tuple[str, list[str]]:
    """``"dad@attack.eps=3.0,attack.steps=2"`` -> ``("dad", ["attack.eps=3.0", "attack.steps=2"])``.

    Raises:
        ValueError: the base mode is unknown, or an extra override is not a dotted ``key=value``.
    """
    base, _, extra = mode.strip().partition("@")
    if base not in MODES:
        raise ValueError(f"unknown ablation mode {base!r} (in {mode!r}); known: {', '.join(MODES)}, or <mode>@k=v,...")
    overrides = [item.strip() for item in extra.split(",") if item.strip()]
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"ablation mode {mode!r}: {item!r} is not a dotted key=value such as attack.eps=3.0")
    return base, overrides


def uses_cache(mode: str) -> bool:
    """Whether the mode's cell caches the teacher (every mode but ``ce``)."""
    return parse_mode(mode)[0] != "ce"


def cell_overrides(mode: str, seed: int) -> list[str]:
    """The config overrides of one cell: the mode's, its custom ones, then the seeds.

    Raises:
        ValueError: as :func:`parse_mode`.
    """
    base, extra = parse_mode(mode)
    seeds = [f"train.seed={int(seed)}"] + ([f"cache.seed={int(seed)}"] if base != "ce" else [])
    return [*MODES[base], *extra, *seeds]


def _split(value: str | Iterable[Any]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [item.strip() for item in items if item.strip()]


def _split_modes(value: str | Iterable[str]) -> list[str]:
    """Commas separate modes, except inside a custom mode's overrides (``dad@a.b=1,a.c=2,kd``)."""
    if not isinstance(value, str):
        return _split(value)
    modes: list[str] = []
    for item in _split(value):
        base = item.partition("@")[0]
        if modes and "@" in modes[-1] and "=" in item and base not in MODES:
            modes[-1] += f",{item}"
        else:
            modes.append(item)
    return modes


def plan_cells(modes: str | Iterable[str], seeds: str | Iterable[int]) -> list[dict[str, Any]]:
    """The cells of a run: every mode with every seed, modes in the given order, duplicates dropped.

    Args:
        modes: ``"ce,kd,dad@attack.eps=3.0"`` or a list.
        seeds: ``"0,1"`` or a list.

    Returns:
        ``[{"mode": ..., "seed": ...}, ...]``.

    Raises:
        ValueError: no modes or seeds, an unknown mode, or a seed that is not an integer.
    """
    mode_list = list(dict.fromkeys(_split_modes(modes)))
    try:
        seed_list = list(dict.fromkeys(int(s) for s in _split(seeds)))
    except ValueError:
        raise ValueError(f"seeds must be integers such as 0,1,2, got {seeds!r}") from None
    if not mode_list or not seed_list:
        raise ValueError(f"the ablation needs at least one mode and one seed, got modes={modes!r} seeds={seeds!r}")
    for mode in mode_list:
        parse_mode(mode)
    return [{"mode": mode, "seed": seed} for mode in mode_list for seed in seed_list]


def cell_name(mode: str, seed: int) -> str:
    """A folder and run name for a cell: ``dad-s0``, ``dad_attack.eps-3.0-s1``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", mode.replace("=", "-")).strip("_") + f"-s{int(seed)}"


def cell_result(
    mode: str, seed: int, eval_report: Mapping[str, Any], survival: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One cell's entry of the report: its top-1 metrics and the cache's attack-survival diagnostics.

    Args:
        mode: the cell's mode.
        seed: the cell's seed.
        eval_report: ``eval_report.json`` of :func:`dad_core.evaluate.evaluate_ood`.
        survival: the cache manifest's ``diagnostics``; dropped for ``ce`` and ``kd`` (no attack).

    Returns:
        ``{"mode", "seed", "metrics": {"clean_top1", "ood_mean_top1", "<suite>_top1", ...}, "survival"}``.
    """
    metrics = {k: float(eval_report[k]) for k in ("clean_top1", "ood_mean_top1") if eval_report.get(k) is not None}
    for name, suite in eval_report.get("suites", {}).items():
        if suite.get("top1") is not None:
            metrics[f"{name}_top1"] = float(suite["top1"])
    keep = survival and parse_mode(mode)[0] not in _NO_SURVIVAL
    return {"mode": mode, "seed": int(seed), "metrics": metrics, "survival": dict(survival) if keep else None}


def run_cell(
    mode: str,
    seed: int,
    *,
    data_root: Path,
    teacher_checkpoint: Path,
    vqgan_checkpoint: Path,
    output_dir: Path,
    cache_dir: Path,
    params: Sequence[str] = (),
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Run one cell: ``dad cache-teacher`` (not for ``ce``), ``dad train`` and ``dad evaluate``, each a process.

    Args:
        mode: the cell's mode (:func:`parse_mode`).
        seed: the training (and cache) seed.
        data_root: the prepared dataset.
        teacher_checkpoint: the fine-tuned teacher.
        vqgan_checkpoint: the VQGAN.
        output_dir: gets ``train/`` (the run folder), ``eval/`` (the evaluation) and ``cell.json``.
        cache_dir: the cell's own teacher cache (kept, so a retried cell resumes).
        params: the run's config overrides, applied before the cell's.
        nproc_per_node: training processes (torchrun when above 1).

    Returns:
        :func:`cell_result`, also written to ``output_dir/cell.json``.

    Raises:
        ValueError: an unknown mode.
        LaunchError: a step failed; the message holds its last output lines.
    """
    from dad_core.io import atomic_write_json
    from dad_core.launch import run_local

    overrides = [arg for item in [*params, *cell_overrides(mode, seed)] for arg in ("-p", item)]
    step = {"data": ["--data-root", str(data_root)], "quiet": ["--no-progress"]}
    train = ["--output", str(output_dir / "train"), "--resume", *step["data"], *step["quiet"], *overrides]
    survival = None
    if uses_cache(mode):
        cache = ["--output", str(cache_dir), "--teacher-checkpoint", str(teacher_checkpoint)]
        cache += ["--vqgan-checkpoint", str(vqgan_checkpoint), *step["data"], *step["quiet"], *overrides]
        run_local(cache, module="dad_core.cli.cache_teacher")
        survival = json.loads((cache_dir / "manifest.json").read_text()).get("diagnostics")
        train += ["--cache", str(cache_dir)]
    run_local(train, nproc_per_node=nproc_per_node, module="dad_core.cli.train")
    evaluate = ["--checkpoint", str(output_dir / "train" / "model"), "--output", str(output_dir / "eval")]
    run_local([*evaluate, *overrides, "-p", f"data.root={data_root}"], module="dad_core.cli.evaluate")
    report = json.loads((output_dir / "eval" / "eval_report.json").read_text())
    result = cell_result(mode, seed, report, survival)
    atomic_write_json(output_dir / "cell.json", result)
    return result


# ------------------------------------------------------------------------------------------------ comparison


def default_metrics(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The corruption suites' top-1 (``<name>-c_top1``: digits-c, imagenet-c), ``ood_mean_top1``, ``clean_top1``."""
    present = {key for cell in cells for key in cell["metrics"]}
    corruption = sorted(key for key in present if key.endswith("-c_top1"))
    return corruption + [key for key in ("ood_mean_top1", "clean_top1") if key in present]


def _summary(diffs: list[float]) -> dict[str, Any]:
    n = len(diffs)
    return {
        "mean": sum(diffs) / n if n else None,
        "std": statistics.stdev(diffs) if n > 1 else (0.0 if n else None),  # sample std (ddof=1)
        "n_pos": sum(d > 0 for d in diffs),
        "n_neg": sum(d < 0 for d in diffs),
    }


def paired_differences(
    cells: Sequence[Mapping[str, Any]], pairs: Iterable[Sequence[str]], metrics: Iterable[str]
) -> list[dict[str, Any]]:
    """Per-seed differences ``a - b`` of each metric, for the seeds where both cells have it, summarized.

    Args:
        cells: :func:`cell_result` entries.
        pairs: ``(a, b)`` mode pairs; a pair with a mode that did not run is left out.
        metrics: metric keys of the cells.

    Returns:
        ``[{"pair": [a, b], "metric", "mean", "std" (ddof=1; 0.0 for one seed), "n_pos", "n_neg",
        "seeds": {"<seed>": difference}}, ...]``, pairs in the given order, then metrics.
    """
    by_cell = {(c["mode"], int(c["seed"])): c["metrics"] for c in cells}
    modes, metrics = {mode for mode, _ in by_cell}, list(metrics)
    rows = []
    for a, b in pairs:
        if a not in modes or b not in modes:
            continue
        seeds = sorted({s for m, s in by_cell if m == a} & {s for m, s in by_cell if m == b})
        for metric in metrics:
            diffs = {
                str(s): by_cell[a, s][metric] - by_cell[b, s][metric]  # str: the same keys after a JSON round trip
                for s in seeds
                if metric in by_cell[a, s] and metric in by_cell[b, s]
            }
            if diffs:
                rows.append({"pair": [a, b], "metric": metric, **_summary(list(diffs.values())), "seeds": diffs})
    return rows


def _default_pairs(modes: Sequence[str]) -> list[list[str]]:
    pairs = [list(p) for p in DEFAULT_PAIRS if p[0] in modes and p[1] in modes]
    custom = [m for m in modes if "@" in m]
    return pairs + [[m, parse_mode(m)[0]] for m in custom if parse_mode(m)[0] in modes]


def ablation_report(
    cells: Sequence[Mapping[str, Any]],
    pairs: Iterable[Sequence[str]] | None = None,
    metrics: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The comparison of a run's cells.

    Args:
        cells: :func:`cell_result` entries (any order).
        pairs: default :data:`DEFAULT_PAIRS` that ran, plus each custom mode against its base mode.
        metrics: default :func:`default_metrics`.

    Returns:
        ``{"modes", "seeds", "metrics", "pairs", "cells" (sorted by mode order, then seed), "paired"}``.
    """
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    ordered = sorted(cells, key=lambda c: (modes.index(c["mode"]), int(c["seed"])))
    pairs = [list(p) for p in pairs] if pairs is not None else _default_pairs(modes)
    metrics = list(metrics) if metrics is not None else default_metrics(cells)
    return {
        "modes": modes,
        "seeds": sorted({int(c["seed"]) for c in cells}),
        "metrics": metrics,
        "pairs": pairs,
        "cells": [dict(c) for c in ordered],
        "paired": paired_differences(ordered, pairs, metrics),
    }


def _cell_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    n = len(row["seeds"])
    return f"{row['mean']:+.2f} ± {row['std']:.2f} ({row['n_pos']}/{n})"


def _mode_means(report: Mapping[str, Any]) -> list[str]:
    lines = ["| mode | seeds | " + " | ".join(report["metrics"]) + " | teacher top-1 on DAD samples |"]
    lines.append("|---|---:|" + "---:|" * (len(report["metrics"]) + 1))
    for mode in report["modes"]:
        cells = [c for c in report["cells"] if c["mode"] == mode]
        means = []
        for metric in report["metrics"]:
            values = [c["metrics"][metric] for c in cells if metric in c["metrics"]]
            means.append(f"{sum(values) / len(values):.2f}" if values else "—")
        survival = [c["survival"]["top1_dad"] for c in cells if (c["survival"] or {}).get("top1_dad") is not None]
        teacher = f"{100 * sum(survival) / len(survival):.1f}" if survival else "—"
        lines.append(f"| {mode} | {len(cells)} | " + " | ".join(means) + f" | {teacher} |")
    return lines


def format_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the paired differences (``mean ± std (n_pos/n)``, top-1 points) and per-mode means."""
    rows = {(tuple(r["pair"]), r["metric"]): r for r in report["paired"]}
    lines = [
        "# Ablation: does the attack help?",
        "",
        f"Paired by seed (seeds {', '.join(map(str, report['seeds']))}): each entry is the difference a − b in top-1",
        "points, `mean ± sample std (seeds where a > b / seeds)`.",
        "",
        "| pair | " + " | ".join(report["metrics"]) + " |",
        "|---|" + "---:|" * len(report["metrics"]),
    ]
    for a, b in report["pairs"]:
        texts = [_cell_text(rows.get(((a, b), m))) for m in report["metrics"]]
        lines.append(f"| {a} − {b} | " + " | ".join(texts) + " |")
    lines += ["", "Mean top-1 (%) per mode:", "", *_mode_means(report)]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> Path:
    """A bar chart of the paired differences per metric, with the seeds' sample std as error bars.

    Returns:
        ``path`` (PNG, written atomically).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    from dad_core.io import atomic_path

    metrics, pairs = report["metrics"], [tuple(p) for p in report["pairs"]]
    rows = {(tuple(r["pair"]), r["metric"]): r for r in report["paired"]}
    fig = Figure(figsize=(max(5.0, 1.2 * len(pairs) * max(1, len(metrics)) / 2 + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(metrics))
    for i, metric in enumerate(metrics):
        found = [rows.get((p, metric)) for p in pairs]
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(pairs))]
        means = [r["mean"] if r else math.nan for r in found]
        errors = [r["std"] if r and r["std"] is not None else 0.0 for r in found]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=metric)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(pairs)), [f"{a} − {b}" for a, b in pairs], rotation=30, ha="right")
    ax.set_ylabel("top-1 difference (points)")
    ax.set_title(f"Paired differences over seeds {', '.join(map(str, report['seeds']))}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    return atomic_path(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def format_html(report: Mapping[str, Any], png: bytes) -> str:
    """A self-contained HTML page: the paired table and the chart embedded as a base64 PNG (for the KFP UI)."""
    rows = {(tuple(r["pair"]), r["metric"]): r for r in report["paired"]}
    head = "".join(f"<th>{html.escape(m)}</th>" for m in report["metrics"])
    body = "".join(
        f"<tr><td>{html.escape(f'{a} − {b}')}</td>"
        + "".join(f"<td>{html.escape(_cell_text(rows.get(((a, b), m))))}</td>" for m in report["metrics"])
        + "</tr>"
        for a, b in report["pairs"]
    )
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Ablation</title></head><body>"
        f"<h2>Ablation: paired differences a − b (top-1 points), seeds {html.escape(str(report['seeds']))}</h2>"
        f"<p>mean ± sample std (seeds where a &gt; b / seeds)</p><table border='1'><tr><th>pair</th>{head}</tr>"
        f"{body}</table><img alt='paired differences' src='data:image/png;base64,{image}'></body></html>\n"
    )


def save_ablation(cells: Sequence[Mapping[str, Any]], output_dir: Path) -> dict[str, Path]:
    """Write ``ablation_report.json``, ``ablation_report.md``, ``ablation.png`` and ``ablation.html``.

    Returns:
        ``{"json", "markdown", "plot", "html"}`` -> path.
    """
    from dad_core.io import atomic_write_json, atomic_write_text

    output_dir = Path(output_dir)
    report = ablation_report(cells)
    paths = {
        "json": atomic_write_json(output_dir / "ablation_report.json", report),
        "markdown": atomic_write_text(output_dir / "ablation_report.md", format_markdown(report)),
        "plot": plot(report, output_dir / "ablation.png"),
    }
    paths["html"] = atomic_write_text(output_dir / "ablation.html", format_html(report, paths["plot"].read_bytes()))
    return paths


def log_ablation(report: Mapping[str, Any], paths: Mapping[str, Path], tracking: Any) -> str | None:
    """MLflow: a parent run ``ablation`` with the comparison files, and one child run per cell.

    Each child logs ``mode`` and ``seed`` as params, the cell's metrics, and its survival diagnostics as
    ``survival/<key>``. Does nothing when tracking is off.

    Args:
        report: :func:`ablation_report`.
        paths: the files of :func:`save_ablation`, logged under ``ablation/``.
        tracking: a :class:`dad_core.config.TrackingConfig`.

    Returns:
        The parent run's id, or None with tracking off.
    """
    from dad_core.tracking import create_tracker

    with create_tracker(tracking, primary=True, run_name="ablation") as parent:
        if not parent.enabled:
            return None
        parent.log_params({"modes": ",".join(report["modes"]), "seeds": ",".join(map(str, report["seeds"]))})
        for row in report["paired"]:
            a, b = row["pair"]
            parent.log_metrics({f"{a}-minus-{b}/{row['metric']}": row["mean"]})
        for path in paths.values():
            parent.log_artifact(Path(path), artifact_path="ablation")
        for cell in report["cells"]:
            name = cell_name(cell["mode"], cell["seed"])
            with create_tracker(tracking, primary=True, run_name=name, system_metrics=False) as child:
                child.log_params({"mode": cell["mode"], "seed": cell["seed"]})
                survival = {f"survival/{k}": v for k, v in (cell["survival"] or {}).items() if v is not None}
                child.log_metrics({**cell["metrics"], **survival})
        return parent.run_id
