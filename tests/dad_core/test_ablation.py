"""``dad_core.ablation``: the cells' overrides, the paired differences, the report files (no training here)."""

from __future__ import annotations

import json
import statistics

import pytest

from dad_core.ablation import (
    ablation_report,
    cell_name,
    cell_overrides,
    cell_result,
    default_metrics,
    format_html,
    format_markdown,
    paired_differences,
    parse_mode,
    plan_cells,
    save_ablation,
    uses_cache,
)
from dad_core.config import load_config


def _cell(mode: str, seed: int, **metrics: float) -> dict:
    return {"mode": mode, "seed": seed, "metrics": metrics, "survival": None}


def test_ce_trains_without_teacher_or_cache():
    overrides = cell_overrides("ce", 3)
    assert not uses_cache("ce")
    assert "cache.seed=3" not in overrides and "train.seed=3" in overrides
    cfg = load_config(None, ["loss.kd_clean_weight=0.5", *overrides])  # a run's own weights do not leak in
    assert not cfg.loss.uses_teacher and cfg.train.seed == 3


@pytest.mark.parametrize(
    ("mode", "attack_mode", "space"),
    [("kd", "none", "pixel"), ("vq_only", "vq_only", "pixel"), ("random", "random", "pixel"), ("dad", "dad", "pixel")],
)
def test_modes_set_the_attack_and_both_seeds(mode, attack_mode, space):
    cfg = load_config(None, ["attack.space=latent", *cell_overrides(mode, 1)])
    assert uses_cache(mode)
    assert cfg.attack.mode == attack_mode and cfg.loss.uses_teacher
    assert cfg.train.seed == 1 and cfg.cache.seed == 1
    if mode != "kd":
        assert cfg.attack.space == space


def test_dad_latent_and_custom_cells():
    assert load_config(None, cell_overrides("dad-latent", 0)).attack.space == "latent"
    cfg = load_config(None, cell_overrides("dad@attack.eps=3.0,attack.steps=2", 0))
    assert (cfg.attack.mode, cfg.attack.eps, cfg.attack.steps) == ("dad", 3.0, 2)
    assert parse_mode("random@attack.eps=2") == ("random", ["attack.eps=2"])
    assert cell_name("dad@attack.eps=3.0", 1) == "dad_attack.eps-3.0-s1"


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown ablation mode 'pgd'.*known: ce, kd, vq_only, random, dad"):
        cell_overrides("pgd", 0)
    with pytest.raises(ValueError, match="unknown ablation mode 'dadd'"):
        plan_cells("ce,dadd@attack.eps=3", "0")
    with pytest.raises(ValueError, match="not a dotted key=value"):
        parse_mode("dad@eps=3")


def test_plan_cells():
    cells = plan_cells("ce,dad@attack.eps=3.0,attack.steps=2,kd,ce", "1, 0")
    assert [(c["mode"], c["seed"]) for c in cells] == [
        ("ce", 1),
        ("ce", 0),
        ("dad@attack.eps=3.0,attack.steps=2", 1),
        ("dad@attack.eps=3.0,attack.steps=2", 0),
        ("kd", 1),
        ("kd", 0),
    ]
    with pytest.raises(ValueError, match="seeds must be integers"):
        plan_cells("ce", "0,x")
    with pytest.raises(ValueError, match="at least one mode"):
        plan_cells("", "0")


def test_paired_differences_on_hand_made_numbers():
    cells = [
        _cell("kd", 0, top1=50.0),
        _cell("kd", 1, top1=60.0),
        _cell("kd", 2, top1=70.0),
        _cell("dad", 0, top1=52.0),
        _cell("dad", 1, top1=59.0),
        _cell("dad", 2, top1=74.0),
        _cell("ce", 0, top1=40.0),  # one seed only: paired on that seed alone
    ]
    (row,) = paired_differences(cells, [("dad", "kd")], ["top1"])
    assert row["pair"] == ["dad", "kd"] and row["seeds"] == {"0": 2.0, "1": -1.0, "2": 4.0}
    assert row["mean"] == pytest.approx(5 / 3)
    assert row["std"] == pytest.approx(statistics.stdev([2.0, -1.0, 4.0]))  # ddof=1
    assert (row["n_pos"], row["n_neg"]) == (2, 1)
    (single,) = paired_differences(cells, [("kd", "ce")], ["top1"])
    assert single["seeds"] == {"0": 10.0} and single["std"] == 0.0 and (single["n_pos"], single["n_neg"]) == (1, 0)
    assert paired_differences(cells, [("random", "kd")], ["top1"]) == []  # random did not run


def test_cell_result_keeps_survival_only_for_attacked_modes():
    report = {
        "clean_top1": 90.0,
        "ood_mean_top1": 60.0,
        "suites": {"digits-c": {"top1": 55.0}, "digits-r": {"top1": 65.0}, "broken": {"status": "skipped"}},
    }
    survival = {"top1_clean": 0.9, "top1_dad": 0.5}
    dad = cell_result("dad", 0, report, survival)
    assert dad["metrics"] == {"clean_top1": 90.0, "ood_mean_top1": 60.0, "digits-c_top1": 55.0, "digits-r_top1": 65.0}
    assert dad["survival"] == survival
    assert cell_result("kd", 0, report, survival)["survival"] is None
    assert cell_result("ce", 0, report, None)["survival"] is None
    assert default_metrics([dad]) == ["digits-c_top1", "ood_mean_top1", "clean_top1"]


def test_report_recomputes_from_cells_and_renders(tmp_path):
    metrics = {"digits-c_top1": 50.0, "ood_mean_top1": 55.0, "clean_top1": 90.0}
    cells = [
        {**_cell(mode, seed), "metrics": {k: v + 3 * i + seed for k, v in metrics.items()}}
        for i, mode in enumerate(["ce", "kd", "vq_only", "random", "dad", "dad-latent"])
        for seed in (0, 1)
    ]
    paths = save_ablation(list(reversed(cells)), tmp_path)
    report = json.loads(paths["json"].read_text())
    assert [c["mode"] for c in report["cells"][:2]] == ["dad-latent", "dad-latent"]  # the cells' own order
    assert [tuple(p) for p in report["pairs"]] == [
        ("kd", "ce"),
        ("dad", "kd"),
        ("random", "kd"),
        ("vq_only", "kd"),
        ("dad", "random"),
        ("dad-latent", "random"),
        ("dad-latent", "dad"),
    ]
    assert report["metrics"] == ["digits-c_top1", "ood_mean_top1", "clean_top1"]
    by = {(c["mode"], c["seed"]): c["metrics"] for c in report["cells"]}
    for row in report["paired"]:
        a, b = row["pair"]
        diffs = [by[a, s][row["metric"]] - by[b, s][row["metric"]] for s in report["seeds"]]
        assert row["mean"] == pytest.approx(sum(diffs) / len(diffs))
        assert row["std"] == pytest.approx(statistics.stdev(diffs))
    markdown = paths["markdown"].read_text()
    assert "| kd − ce | +3.00 ± 0.00 (2/2) | +3.00 ± 0.00 (2/2) | +3.00 ± 0.00 (2/2) |" in markdown
    assert markdown == format_markdown(ablation_report(list(reversed(cells))))
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "<table" in page
    assert format_html(report, b"png").count("<tr>") == 1 + len(report["pairs"])
