"""The evaluation report as one self-contained HTML page: the accuracy chart inlined, the per-suite table.

The Kubeflow UI renders an ``HTML`` artifact in a sandboxed frame that loads nothing else, so the chart travels as a
base64 ``data:`` URI inside the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["eval_report_html"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape("—" if value is None else str(value))


def eval_report_html(report: Mapping[str, Any], plot: str | Path | None = None) -> str:
    """One HTML page: the headline numbers, the chart (when ``plot`` exists) and a row per suite.

    Args:
        report: the report of :func:`dad_core.evaluate.evaluate_suites` (``eval_report.json``).
        plot: ``accuracy.png``; inlined as base64.

    Returns:
        The page.
    """
    rows = "".join(
        f"<tr><td>{_cell(name)}</td><td>{_cell(r.get('kind'))}</td><td>{_cell(r.get('status'))}</td>"
        f"<td>{_cell(r.get('top1'))}</td><td>{_cell(r.get('top5'))}</td><td>{_cell(r.get('count'))}</td></tr>"
        for name, r in report["suites"].items()
    )
    image = ""
    if plot is not None and Path(plot).is_file():
        data = base64.b64encode(Path(plot).read_bytes()).decode("ascii")
        image = f'<img alt="top-1 by suite" src="data:image/png;base64,{data}">'
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Evaluation</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "td:nth-child(n+4){text-align:right}</style></head><body><h2>Evaluation</h2>"
        f"<p>Clean top-1: {_cell(report.get('clean_top1'))} ({_cell(report.get('clean_suite'))}). "
        f"OOD mean top-1: {_cell(report.get('ood_mean_top1'))} over {len(report.get('ood_suites', []))} suite(s).</p>"
        f"{image}<table><tr><th>suite</th><th>kind</th><th>status</th><th>top-1 (%)</th><th>top-5 (%)</th>"
        f"<th>images</th></tr>{rows}</table></body></html>\n"
    )
