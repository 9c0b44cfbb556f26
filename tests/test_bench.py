"""The benchmark scripts (``bench/``) run on CPU tiny configurations and write what the docs and the GPU run read.

Timings on a shared CPU are noise; these tests only keep the scripts from rotting: each ``main([...])`` exits 0,
its JSON has the device/version fields, every row has a positive throughput and ratio, and ``run_all`` keeps going
when one benchmark fails.
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch

pytestmark = pytest.mark.slow

QUICK = ["--warmup", "0", "--iters", "1", "--batch-size", "4", "--quiet"]
NAMES = ("generation", "training", "vqgan")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each benchmark run once through its ``main`` on the CPU tiny configuration: ``{name: (exit code, JSON)}``."""
    out = {}
    for name in NAMES:
        path = tmp_path_factory.mktemp("bench") / f"{name}.json"
        code = importlib.import_module(f"bench.{name}").main([*QUICK, "--json", str(path)])
        out[name] = code, json.loads(path.read_text())
    return out


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_main_writes_rows_and_positive_ratios(results, name):
    code, result = results[name]
    module = importlib.import_module(f"bench.{name}")

    assert code == 0
    assert result["benchmark"] == name
    assert result["device_info"]["device_name"] and result["device_info"]["torch"] == torch.__version__
    expected = {f"resnet10t/{k}" for k in module.DEFAULT_ROWS} if name == "training" else set(module.DEFAULT_ROWS)
    assert {r["name"] for r in result["rows"]} == expected
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["batch_size"] == 4 and row["dtype"]
        assert row["images_per_s"] > 0 and row["ratio"] > 0
    assert result["ratios"]
    assert all(isinstance(r["value"], float) and r["value"] > 0 for r in result["ratios"])


def test_generation_product_matches_the_plain_formulation_on_cpu(results):
    agreement = results["generation"][1]["agreement_vs_naive_fp32"]["product"]

    # On a CPU the product runs the same fp32 math (no autocast there), so the chunked codebook lookup must pick
    # the same codes as the full distance matrix.
    assert agreement["codes_x0_agree"] == 1.0 and agreement["codes_dad_agree"] == 1.0
    assert agreement["dad_max_abs_diff"] < 1e-4


def test_run_all_reports_a_failing_benchmark_and_keeps_the_others(results, tmp_path, monkeypatch):
    from bench import run_all, training, vqgan

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(vqgan, "run", out_of_memory)
    monkeypatch.setattr(training, "run", lambda args: copy.deepcopy(results["training"][1]))  # measured above
    code = run_all.main(["--json-dir", str(tmp_path), "--only", "vqgan,training", "--batch-size", "4"])

    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"]["vqgan"].startswith("failed: OutOfMemoryError")
    assert summary["status"]["training"].startswith("ok")
    assert json.loads((tmp_path / "training.json").read_text())["rows"]
    assert "## training" in (tmp_path / "summary.md").read_text()


def test_cache_bytes_per_image_matches_a_real_shard():
    from bench._common import create_teacher
    from bench.costs import cache_bytes_per_image
    from dad_core.attack import IdentityDiscretizer
    from dad_core.config import load_config
    from dad_core.teacher_cache import _make_shard

    cfg = load_config(None, ["data.image_size=32", "cache.views=2", "cache.topk=10", "cache.batch_size=4"])
    dataset = [(torch.rand(3, 32, 32), i % 10) for i in range(4)]
    teacher = create_teacher("dad-tiny-clip", 10, torch.device("cpu"))

    shard = _make_shard(teacher, IdentityDiscretizer(), dataset, list(range(4)), cfg, 0, torch.device("cpu"))

    stored = sum(t.numel() * t.element_size() for t in shard.values()) / len(dataset)
    assert stored == cache_bytes_per_image(image_size=32, topk=10, views=2, num_classes=10)
    assert cache_bytes_per_image() == 301_408  # 224 px, k = 10, R = 2, 1000 classes (docs/benchmarks.md)
