"""The benchmark scripts (``bench/``) run on CPU tiny configurations and write what the docs and the GPU run read.

Timings on a shared CPU are noise; these tests only keep the scripts from rotting: each ``main([...])`` exits 0,
its JSON has the device/version fields, every row has a positive throughput and ratio, and ``run_all`` keeps going
when one benchmark fails.
"""

from __future__ import annotations

import copy
import importlib
import json
from types import SimpleNamespace

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

    shard, _ = _make_shard(teacher, IdentityDiscretizer(), dataset, list(range(4)), cfg, 0, torch.device("cpu"))

    size = {key: t.numel() * t.element_size() for key, t in shard.items()}
    stored = sum(v for key, v in size.items() if not key.startswith("preview_")) / len(dataset)
    assert stored == cache_bytes_per_image(image_size=32, topk=10, views=2, num_classes=10)
    # plus, per shard, the samples.png preview of its first min(8, n) images: VQ(x), VQ(VQ(x)) and 4 int32 predictions
    assert sum(v for key, v in size.items() if key.startswith("preview_")) == 4 * (2 * 3 * 32 * 32 + 4 * 4)
    assert cache_bytes_per_image() == 301_408  # 224 px, k = 10, R = 2, 1000 classes (docs/benchmarks.md)


def test_throughput_rows_compare_before_and_after_in_one_run(tmp_path):
    from bench import throughput

    path = tmp_path / "throughput.json"
    argv = ["--shards", "3", "--shard-images", "4", "--image-size", "32", "--loader-images", "8", "--batch-size", "4"]
    sizes = ["--quant-rows", "64", "--codes", "256", "--code-dim", "8", "--repeats", "1", "--device", "cpu"]

    code = throughput.main([*argv, *sizes, "--quiet", "--json", str(path)])

    result = json.loads(path.read_text())
    assert code == 0 and result["cpu_model"]
    names = [r["name"] for r in result["rows"]]
    assert names == [
        "cache-open (start-up)",
        "loader CPU per image",
        "loader CPU per image, RandAugment",
        "quantizer",
        "quantizer vs explicit distance",
    ]
    assert all(r["before"] > 0 and r["after"] > 0 and r["ratio"] > 0 for r in result["rows"])
    assert result["quantizer"]["fused_equals_three_step"] is True
    assert result["device_replay_ms_per_image"] > 0 and result["device_replay_randaugment_ms_per_image"] > 0


def test_compile_mode_rows_are_known_and_map_to_torch_compile_modes():
    from bench import _common, generation, run_all, vqgan

    assert _common.split_compile_mode("product-autotune") == ("product", "max-autotune")
    assert _common.split_compile_mode("bf16-cudagraphs") == ("bf16", "reduce-overhead")
    assert _common.split_compile_mode("product-bf16-compiled") == ("product-bf16", "default")
    assert _common.split_compile_mode("reference") == ("reference", None)
    for bench, row in run_all.COMPILE_ROWS:  # every row run_all schedules is one its benchmark knows
        assert row in {"vqgan": vqgan.ROWS, "generation": generation.ROWS, "training": run_all.training.ROWS}[bench]
    assert {"product-autotune", "product-cudagraphs"} <= set(vqgan.ROWS)
    assert {"product-bf16-autotune", "product-bf16-cudagraphs"} <= set(generation.ROWS)


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("vqgan", "product-compiled,product-autotune,product-cudagraphs"),
        ("generation", "product-bf16-compiled,product-bf16-autotune,product-bf16-cudagraphs"),
    ],
)
def test_compile_mode_rows_pass_their_mode_to_torch_compile(name, rows, tmp_path, monkeypatch):
    modes = []

    def fake_compile(module, mode=None, **kwargs):  # records the mode, runs eager (compiling costs minutes here)
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    path = tmp_path / f"{name}.json"
    code = importlib.import_module(f"bench.{name}").main([*QUICK, "--rows", rows, "--json", str(path)])

    result = json.loads(path.read_text())
    assert code == 0 and [r["name"] for r in result["rows"]] == rows.split(",")
    assert all(r["compile"] and r["images_per_s"] > 0 for r in result["rows"])
    assert {"default", "max-autotune", "reduce-overhead"} <= set(modes)
    if name == "vqgan":
        assert {"product-autotune / product-compiled", "product-cudagraphs / product-compiled"} <= {
            r["name"] for r in result["ratios"]
        }


def test_the_whole_shard_row_runs_compiled_with_the_bf16_vqgan(tmp_path, monkeypatch):
    """``cache-shard-bf16-compiled``: the product's own ``_make_shard`` with a compiled teacher and VQGAN and
    ``vqgan.precision: bf16``, what ``cache.compile: true`` with that precision runs."""
    import dad_core.teacher_cache as tc
    from bench import generation

    compiled, precisions = [], []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, **kwargs: compiled.append(mode) or module)
    make_shard = tc._make_shard

    def spy(teacher, vqgan, *args, **kwargs):
        precisions.append(vqgan.precision)
        return make_shard(teacher, vqgan, *args, **kwargs)

    monkeypatch.setattr(tc, "_make_shard", spy)
    path = tmp_path / "generation.json"
    rows = "cache-shard,cache-shard-bf16-compiled"

    code = generation.main([*QUICK, "--rows", rows, "--json", str(path)])

    result = json.loads(path.read_text())
    assert code == 0 and [r["name"] for r in result["rows"]] == rows.split(",")
    assert [r["compile"] for r in result["rows"]] == [False, True] and len(compiled) == 3  # encoder, decoder, teacher
    assert set(precisions) == {"fp32", "bf16"} and precisions[-1] == "bf16"
    assert "cache-shard-bf16-compiled" in generation.COMPILED_ROWS and ("generation", rows.split(",")[1]) in (
        importlib.import_module("bench.run_all").COMPILE_ROWS
    )


def test_the_replay_rows_make_the_views_in_the_step(tmp_path, monkeypatch):
    """``cached-replay(-randaugment)``: the step gets uint8 images and view rows and calls the product's replay."""
    import dad_core.train
    import dad_core.train_data
    from bench import training

    calls, kept_on_host = [], set()
    replay, to_device = dad_core.train_data.replay_views, dad_core.train._to_device

    def spy(batch, size, *, randaugment=""):
        drawn = tuple(batch["randaugment"].shape) if "randaugment" in batch else None
        calls.append((batch["clean"].dtype, tuple(batch["view"].shape), drawn, size, randaugment))
        return replay(batch, size, randaugment=randaugment)

    def to_device_spy(batch, dev, channels_last, host_keys=()):
        kept_on_host.add(host_keys)
        return to_device(batch, dev, channels_last, host_keys)

    monkeypatch.setattr(dad_core.train_data, "replay_views", spy)
    monkeypatch.setattr(dad_core.train, "_to_device", to_device_spy)
    path = tmp_path / "training.json"
    rows = "plain,cached-replay,cached-replay-randaugment"

    assert training.main([*QUICK, "--rows", rows, "--json", str(path)]) == 0

    result = json.loads(path.read_text())
    assert [r["name"] for r in result["rows"]] == [f"resnet10t/{r}" for r in rows.split(",")]
    # the RandAugment row's batch carries the loader's draws (2 layers), and the step keeps them and the view rows
    # on the host, as the training loop does
    assert {(torch.uint8, (4, 6), None, 32, "")} == {c for c in calls if not c[4]}
    assert {(torch.uint8, (4, 6), (4, 2, 2), 32, training.RANDAUGMENT)} == {c for c in calls if c[4]}
    assert ("view", "randaugment") in kept_on_host
    names = {r["name"] for r in result["ratios"]}
    assert {
        "resnet10t/cached-replay / resnet10t/plain",
        "resnet10t/cached-replay-randaugment / resnet10t/plain",
    } <= names


def test_chained_timing_runs_the_steps_back_to_back_and_reports_per_step(monkeypatch):
    """``chain``: each timing covers that many calls with no wait between them; times and rates stay per step."""
    from bench import _common as common

    clock, calls = [0.0], []
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step():  # 5 ms of the benchmark's clock per call
        calls.append(1)
        clock[0] += 0.005

    row = common.measure("x", step, torch.device("cpu"), warmup=2, iters=3, chain=4, images_per_step=8)

    assert len(calls) == 2 + 3 * 4
    assert row["chain"] == 4 and row["times_ms"] == pytest.approx([5.0] * 3)  # per step: a chain is 20 ms
    assert row["ms_per_step"] == pytest.approx(5.0) and row["images_per_s"] == pytest.approx(1600)
    assert "chain" not in common.measure("y", step, torch.device("cpu"), warmup=0, iters=1, images_per_step=1)


def test_the_shard_rows_diagnose_the_share_of_a_recipe_sized_shard(monkeypatch):
    """A one-batch shard of 64 diagnoses 2 images, as a 1,024-image shard diagnoses 32, and the product's constant
    is restored after each step."""
    from bench import generation
    from dad_core import teacher_cache

    seen = []
    monkeypatch.setattr(teacher_cache, "_make_shard", lambda *a: seen.append(teacher_cache.DIAGNOSTIC_IMAGES))
    images, labels = torch.zeros(64, 3, 8, 8), torch.zeros(64, dtype=torch.long)

    generation._shard_step(None, None, images, labels, None, torch.device("cpu"))()

    assert seen == [2] and teacher_cache.DIAGNOSTIC_IMAGES == 32
    assert generation.diagnostic_images(16) == 1


def test_randaugment_ops_times_every_op_through_the_batched_path(tmp_path):
    """One row per op of the policy plus the merged geometric row, the whole-step rows, and the tensor ops the
    RandAugment adds to a step (the host's cost on a GPU), counted on the device the step runs on."""
    from bench import randaugment_ops
    from dad_core.randaugment import parse_randaugment

    path = tmp_path / "ops.json"
    argv = ["--images", "3", "--size", "16", "--batch", "4", "--iters", "1", "--chain", "1", "--device", "cpu"]

    assert randaugment_ops.main([*argv, "--json", str(path)]) == 0

    result = json.loads(path.read_text())
    ops = [row["op"] for row in result["ops"]]
    assert ops == [*parse_randaugment(randaugment_ops.POLICY).ops, "geometric, merged"]
    assert all(row["ms"] > 0 for row in result["ops"]) and set(result["steps_ms"]) == {"replay", "replay+randaugment"}
    assert 0 < result["device_ops"]["replay"] < result["device_ops"]["replay+randaugment"] < 1000
    assert result["device_ops"]["replay"] < 60  # the resize is batched: its ops do not grow with the batch
    # on a CPU the step is compared with itself: this holds the field's form (a GPU run fills it with news)
    assert result["vs_cpu"]["replay"] == {"max_abs": 0.0, "share_equal": 1.0}
    counted = randaugment_ops.count_device_ops(lambda: torch.ones(2, 2) + 1, torch.device("cpu"))
    assert counted == 2  # ones, add


@pytest.mark.parametrize("script", ["bench/gpu_run.sh", "bench/gpu_next.sh"])
def test_the_gpu_scripts_parse(script):
    """The GPU scripts only run where a device is lent: a syntax slip would cost that run. (Both were run on this CPU
    with FULL=0 when written; bash -n keeps them parseable since.)"""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / script)], capture_output=True, text=True).returncode == 0
