"""Evaluation numbers against hand-computed ones, on image folders whose predictions are known in advance.

Every test image is a flat 8x8 PNG whose red value encodes the class the model will predict (``16 * p``).
:class:`EncodedPredictionModel` reads it back and returns logits ``-((c - p) mod N)``: its top-1 is ``p`` and
its top-5 is ``p, p+1, ..., p+4`` (mod N), so every expected accuracy below is worked out by hand in a comment.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from dad_core.data import ClassList
from dad_core.errors import DADError
from dad_core.evaluate import (
    IMAGENET_SUITES,
    SuiteSpec,
    discover_suites,
    evaluate_suites,
    flatten_metrics,
    imagenet_suite,
    load_alexnet_errors,
    load_suite_spec,
    load_wnids,
    resolve_eval_transform,
    resolve_suites,
    save_report,
    shard_indices,
)

IDS = tuple(f"n{i:02d}" for i in range(12))  # a fake 12-class "WordNet" list, sorted
CLASSES = ClassList(IDS, IDS)
DIGITS = ClassList(tuple(str(i) for i in range(10)), tuple(str(i) for i in range(10)))


class EncodedPredictionModel(nn.Module):
    """Predicts the class encoded in the image's red channel; counts the images it has seen."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        predicted = torch.round(images[:, 0].mean(dim=(1, 2)) * 255 / 16).long()
        self.seen += len(images)
        classes = torch.arange(self.num_classes, device=images.device)
        return -((classes[None] - predicted[:, None]) % self.num_classes).float()


def write_folder(root: Path, predictions: dict[str, list[int]]) -> Path:
    """``root/<class folder>/<i>.png`` for each encoded prediction."""
    for folder, preds in predictions.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, pred in enumerate(preds):
            Image.new("RGB", (8, 8), (16 * pred, 0, 0)).save(root / folder / f"{i}.png")
    return root


def run(suites, classes=CLASSES, **kwargs):
    kwargs = {"image_size": 8, "batch_size": 4, "progress": False, **kwargs}
    return evaluate_suites(EncodedPredictionModel(len(classes)), suites, class_list=classes, **kwargs)


def test_class_folders_top1_top5(tmp_path):
    # n00: p0 right; p11 wrong, top-5 right ((0 - 11) % 12 = 1); p5 wrong, top-5 wrong ((0 - 5) % 12 = 7)
    # n03: two right. n07: p2 wrong, top-5 wrong ((7 - 2) % 12 = 5). Top-1 3/6, top-5 4/6.
    write_folder(tmp_path / "val", {"n00": [0, 11, 5], "n03": [3, 3], "n07": [2]})
    result = run([SuiteSpec("val", tmp_path / "val", kind="clean")])["suites"]["val"]
    assert result == {
        "status": "ok",
        "kind": "clean",
        "top1": pytest.approx(50.0),
        "top5": pytest.approx(400 / 6),
        "count": 6,
    }


def test_integer_folders_map_by_value_not_string_order(tmp_path):
    # Folders "10" and "2" mean classes 10 and 2; string order would call them 0 and 1 and get 0/4 right.
    write_folder(tmp_path / "v2", {"10": [10, 10], "2": [2, 10]})
    report = run([SuiteSpec("v2", tmp_path / "v2", layout="integer-folders")])
    assert report["suites"]["v2"]["top1"] == pytest.approx(75.0)


def test_subset_masks_logits_and_reindexes_labels(tmp_path):
    # Subset n03, n05, n08. n05 with p4: the full argmax (4) is outside the subset, but over {3, 5, 8} the logits are
    # -11, -1, -4, so 5 wins: right. n08 with p6: -9, -11, -2: right. n03 with p3: right; n03 with p4: 5 wins: wrong.
    write_folder(tmp_path / "r", {"n03": [3, 4], "n05": [4], "n08": [6]})
    subset = SuiteSpec("r", tmp_path / "r", kind="rendition", subset=("n08", "n03", "n05"))
    plain = SuiteSpec("plain", tmp_path / "r")
    report = run([subset, plain])
    assert report["suites"]["r"]["top1"] == pytest.approx(75.0)
    assert "top5" not in report["suites"]["r"]  # 3 classes: no top-5
    assert report["suites"]["plain"]["top1"] == pytest.approx(25.0)  # unmasked, only n03/p3 is right


def test_subset_rejects_folders_outside_it_and_unknown_ids(tmp_path):
    write_folder(tmp_path / "a", {"n03": [3], "n01": [1]})
    with pytest.raises(DADError, match="n01"):
        run([SuiteSpec("a", tmp_path / "a", subset=("n03", "n05"))])
    with pytest.raises(DADError, match="n99"):
        run([SuiteSpec("a", tmp_path / "a", subset=("n03", "n99"))])


def write_severities(root: Path, per_severity: dict[str, dict[str, list[int]]]) -> None:
    """``root/<severity>/<class folder>/<i>.png`` for each severity's encoded predictions."""
    for severity, predictions in per_severity.items():
        write_folder(root / severity, predictions)


CORRUPTION_LAYOUT = "corruption/severity/class-folders"


def test_corruption_suite_mce_over_all_corruptions(tmp_path):
    root = tmp_path / "fake-c"
    write_folder(tmp_path / "val", {"n00": [0, 0, 0, 1]})  # clean top-1 75: clean error 25
    # blur, per severity: 100, 50, 50, 50, 0 -> mean error 50 = 250 / 5; AlexNet's sum 5 x 50 -> CE 250/250 = 100
    write_severities(root / "blur", {"1": {"n00": [0, 0]}, "5": {"n00": [1, 1]}})
    write_severities(root / "blur", {s: {"n00": [0, 1]} for s in ("2", "3", "4")})
    # noise: 25 at every severity -> error 75 -> CE 75 / 0.75 = 100
    write_severities(root / "noise", {s: {"n01": [1, 0, 0, 0]} for s in ("1", "2", "3", "4", "5")})
    baseline = {"blur": 0.5, "noise": 0.75}
    spec = SuiteSpec(
        "fake-c", root, "corruption", CORRUPTION_LAYOUT, baseline_errors=baseline, baseline_clean_error=0.25
    )
    report = run([SuiteSpec("val", tmp_path / "val", kind="clean"), spec])
    result = report["suites"]["fake-c"]
    assert result["corruptions"]["blur"]["ce"] == pytest.approx(100.0)
    assert result["corruptions"]["noise"]["ce"] == pytest.approx(100.0)
    assert result["mce"] == pytest.approx(100.0)  # an AlexNet-like model scores 100, as AlexNet does
    # relative CE: blur 100 (50 - 25) / (50 - 25) = 100; noise 100 (75 - 25) / (75 - 25) = 100
    assert result["corruptions"]["blur"]["relative_ce"] == pytest.approx(100.0)
    assert result["relative_mce"] == pytest.approx(100.0)
    assert result["mce_unnormalized"] == pytest.approx((50.0 + 75.0) / 2)
    assert result["relative_mce_unnormalized"] == pytest.approx(62.5 - 25.0)
    assert result["mce_corruptions"] == 2 and result["corruptions_not_comparable"] == []
    assert not any(key.endswith("_partial") for key in result)
    assert result["count"] == 30


def test_corruption_with_missing_severities_is_not_comparable_and_mce_is_partial(tmp_path, caplog):
    root = tmp_path / "fake-c"
    write_folder(tmp_path / "val", {"n00": [0, 0, 0, 1]})  # clean error 25
    # blur: 100, 50, 50, 50, 0 -> error 50, CE 50 / 0.5 = 100, relative 100 (50 - 25) / (50 - 30) = 125
    write_severities(root / "blur", {"1": {"n00": [0, 0]}, "5": {"n00": [1, 1]}})
    write_severities(root / "blur", {s: {"n00": [0, 1]} for s in ("2", "3", "4")})
    # noise: 75 at every severity -> error 25, CE 25 / 0.8 = 31.25, relative 100 (25 - 25) / (80 - 30) = 0
    write_severities(root / "noise", {s: {"n01": [1, 1, 1, 0]} for s in ("1", "2", "3", "4", "5")})
    write_severities(root / "fog", {"1": {"n00": [3, 3]}})  # severity 1 only, all wrong: raw error 100, no CE
    write_severities(root / "speckle", {"1": {"n00": [0]}})  # no baseline: left out
    baseline = {"blur": 0.5, "noise": 0.8, "fog": 0.6, "snow": 0.7}  # snow has no folder
    spec = SuiteSpec(
        "fake-c", root, "corruption", CORRUPTION_LAYOUT, baseline_errors=baseline, baseline_clean_error=0.3
    )
    report = run([SuiteSpec("val", tmp_path / "val", kind="clean"), spec])
    result = report["suites"]["fake-c"]
    assert set(result["corruptions"]) == {"blur", "fog", "noise"}
    fog = result["corruptions"]["fog"]
    assert fog["comparable"] is False and fog["severities_missing"] == ["2", "3", "4", "5"]
    assert fog["error"] == pytest.approx(100.0)  # the raw mean error, reported
    assert "ce" not in fog and "relative_ce" not in fog  # not 100 / 0.6 = 166.7 against a five-severity mean
    assert result["corruptions_not_comparable"] == ["fog"]
    assert "fog" in caplog.text and "not comparable" in caplog.text
    assert result["corruptions"]["blur"]["ce"] == pytest.approx(100.0)
    assert result["corruptions"]["noise"]["ce"] == pytest.approx(31.25)
    assert "mce" not in result and "relative_mce" not in result  # 2 of 4 corruptions: only the partial keys
    assert result["mce_partial"] == pytest.approx((100.0 + 31.25) / 2)
    assert result["relative_mce_partial"] == pytest.approx((125.0 + 0.0) / 2)
    assert result["mce_unnormalized_partial"] == pytest.approx((50.0 + 25.0) / 2)
    assert result["relative_mce_unnormalized_partial"] == pytest.approx(37.5 - 25.0)
    assert result["mce_corruptions"] == 2 and result["mce_corruptions_full"] == 4
    assert result["top1"] == pytest.approx((50.0 + 75.0 + 0.0) / 3)  # accuracy still over every corruption scored
    assert result["count"] == 10 + 20 + 2
    assert result["corruptions_missing"] == ["snow"]
    flat = flatten_metrics(report)
    assert flat["fake-c/mce_partial"] == pytest.approx(65.625) and "fake-c/mce" not in flat
    assert flat["fake-c/mce_corruptions"] == 2
    markdown = save_report(report, tmp_path / "out")["markdown"].read_text()
    assert "partial mCE over 2 of 4 corruptions" in markdown
    assert "not comparable, severities missing: fog" in markdown


def test_imagenet_c_all_wrong_at_severity_one_only_gets_no_ce(tmp_path):
    # The bug this guards against: error 100 / AlexNet's five-severity mean 0.886428 = CE 112.8, where the formula
    # (sum over the same severities) would divide by AlexNet's severity-1 error instead (~143.8).
    write_severities(tmp_path / "imagenet-c" / "gaussian_noise", {"1": {"n00": [1, 2, 3]}})
    result = run([imagenet_suite("imagenet-c", tmp_path)])["suites"]["imagenet-c"]
    noise = result["corruptions"]["gaussian_noise"]
    assert noise["comparable"] is False and noise["error"] == pytest.approx(100.0) and "ce" not in noise
    assert result["mce_corruptions"] == 0 and result["mce_corruptions_full"] == 15
    assert not {"mce", "mce_partial", "mce_unnormalized", "mce_unnormalized_partial"} & set(result)
    assert result["corruptions_not_comparable"] == ["gaussian_noise"]
    assert len(result["corruptions_missing"]) == 14
    assert result["baseline_clean_error"] == pytest.approx(43.45)


def test_baseline_clean_error_must_sit_below_the_corruption_errors(tmp_path):
    with pytest.raises(ValueError, match="baseline_clean_error"):
        SuiteSpec(
            "c", tmp_path, "corruption", CORRUPTION_LAYOUT, baseline_errors={"fog": 0.4}, baseline_clean_error=0.5
        )
    with pytest.raises(ValueError, match="needs baseline_errors"):
        SuiteSpec("c", tmp_path, "corruption", CORRUPTION_LAYOUT, baseline_clean_error=0.2)


def write_digits_suites(root: Path) -> Path:
    """The layout the prepare step writes: <root>/suites/<suite>/suite.json plus images."""
    suites = root / "suites"
    write_folder(suites / "digits-val", {"0": [0, 1], "1": [1, 1]})  # 3/4 = 75
    write_folder(suites / "digits-r", {"0": [0], "2": [3]})  # 1/2 = 50
    write_folder(suites / "digits-c" / "gaussian_noise" / "1", {"0": [0], "1": [2]})  # 50
    write_folder(suites / "digits-c" / "gaussian_noise" / "3", {"0": [4]})  # 0 -> noise 25, error 75 (2 of 5 sev.)
    for severity in ("1", "2", "3", "4", "5"):
        write_folder(suites / "digits-c" / "contrast" / severity, {"1": [1]})  # 100 -> contrast error 0
    for name, kind, layout in [
        ("digits-val", "clean", "class-folders"),
        ("digits-r", "rendition", "class-folders"),
        ("digits-c", "corruption", "corruption/severity/class-folders"),
    ]:
        (suites / name / "suite.json").write_text(json.dumps({"name": name, "kind": kind, "layout": layout}))
    (root / "classes.txt").write_text("".join(f"{i}\n" for i in range(10)))
    return suites


def test_suite_json_discovery_and_summary(tmp_path):
    suites = write_digits_suites(tmp_path)
    specs = resolve_suites(suites, ["auto", "imagenet-r"])
    assert [s.name for s in specs] == ["digits-val", "digits-c", "digits-r", "imagenet-r"]
    report = run(specs, classes=DIGITS)
    digits_c = report["suites"]["digits-c"]
    assert "mce" not in digits_c and "mce_partial" not in digits_c  # no AlexNet baseline for digits
    assert digits_c["top1"] == pytest.approx(62.5)  # (25 + 100) / 2
    assert digits_c["corruptions"]["gaussian_noise"]["error"] == pytest.approx(75.0)  # raw, severities 1 and 3
    assert digits_c["corruptions_not_comparable"] == ["gaussian_noise"]
    assert "mce_unnormalized" not in digits_c  # contrast alone is 1 of 15 corruptions: a partial mean only
    assert digits_c["mce_unnormalized_partial"] == pytest.approx(0.0)
    assert digits_c["relative_mce_unnormalized_partial"] == pytest.approx(-25.0)  # 0 - (100 - 75)
    assert report["clean_suite"] == "digits-val"
    assert report["clean_top1"] == pytest.approx(75.0)
    assert report["ood_mean_top1"] == pytest.approx((62.5 + 50.0) / 2)  # the skipped imagenet-r is not a zero
    assert report["suites"]["imagenet-r"]["status"] == "skipped"
    assert "not found" in report["suites"]["imagenet-r"]["reason"]
    assert report["skipped"] == ["imagenet-r"]
    assert report["ood_suites"] == ["digits-c", "digits-r"]
    assert flatten_metrics(report)["digits-c/mce_unnormalized_partial"] == pytest.approx(0.0)
    assert "imagenet-r/top1" not in flatten_metrics(report)


def test_bad_suite_json_names_the_file(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "suite.json").write_text(json.dumps({"kind": "sideways"}))
    with pytest.raises(DADError, match="suite.json"):
        discover_suites(tmp_path)
    assert load_suite_spec(write_digits_suites(tmp_path / "d") / "digits-val").kind == "clean"


def test_imagenet_registry_and_package_data(tmp_path):
    r_wnids, a_wnids = load_wnids("imagenet-r"), load_wnids("imagenet-a")
    assert len(set(r_wnids)) == len(set(a_wnids)) == 200
    assert list(r_wnids) == sorted(r_wnids)
    errors = load_alexnet_errors()
    assert len(errors) == 15
    assert errors["gaussian_noise"] == pytest.approx(0.886428)
    spec = imagenet_suite("imagenet-c", tmp_path)
    assert spec.layout == "corruption/severity/class-folders"
    assert spec.baseline_errors == errors
    assert imagenet_suite("imagenet-v2", tmp_path).path == tmp_path / "imagenetv2"
    report = run(resolve_suites(tmp_path, ["imagenet"]))  # nothing on disk: all skipped, no means
    assert list(report["suites"]) == list(IMAGENET_SUITES)
    assert report["skipped"] == sorted(IMAGENET_SUITES)
    assert report["clean_top1"] is None
    assert report["ood_mean_top1"] is None


def test_model_class_count_mismatch_is_a_clear_error(tmp_path):
    write_folder(tmp_path / "val", {"0": [0]})
    with pytest.raises(DADError, match="class list has 10"):
        evaluate_suites(
            EncodedPredictionModel(12),
            [SuiteSpec("val", tmp_path / "val")],
            class_list=DIGITS,
            image_size=8,
            batch_size=2,
            progress=False,
        )


def test_resolve_eval_transform_reads_pretrained_cfg():
    wrapper = nn.Sequential(nn.Identity())
    wrapper[0].pretrained_cfg = {"crop_pct": 0.95, "interpolation": "bilinear"}
    assert resolve_eval_transform(wrapper) == (0.95, "bilinear")
    assert resolve_eval_transform(wrapper, 1.0, "bicubic") == (1.0, "bicubic")
    assert resolve_eval_transform(nn.Identity()) == (1.0, "bicubic")


def test_save_report_writes_json_markdown_and_png(tmp_path):
    report = run(resolve_suites(write_digits_suites(tmp_path), ["auto", "stylized"]), classes=DIGITS)
    paths = save_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    markdown = paths["markdown"].read_text()
    assert "| digits-val | clean | 75.00 |" in markdown
    assert "skipped: folder not found" in markdown
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG"
        assert image.width > 100
        image.verify()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "accuracy.png",
        "eval_report.json",
        "eval_report.md",
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_every_sample(world_size):
    for num_samples in range(0, 11):
        shards = [list(shard_indices(num_samples, rank, world_size)) for rank in range(world_size)]
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(num_samples))  # each sample once: no padded duplicates
    with pytest.raises(ValueError):
        shard_indices(4, world_size, world_size)


def _distributed_worker(rank: int, world_size: int, init_file: str, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = EncodedPredictionModel(len(CLASSES))
        report = evaluate_suites(
            model,
            [SuiteSpec("val", Path(folder), kind="clean")],
            class_list=CLASSES,
            image_size=8,
            batch_size=2,
            progress=False,
        )
        Path(out, f"{rank}.json").write_text(json.dumps({"report": report, "seen": int(model.seen)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: ~15 s on 2 cores; the shard test above is the fast tier
def test_two_process_gloo_counts_are_exact(tmp_path):
    # 7 images over 2 ranks (4 + 3): DistributedSampler would pad to 8 and count one image twice.
    write_folder(tmp_path / "val", {"n00": [0, 11, 5], "n03": [3, 3], "n07": [2, 7]})  # top-1 4/7, top-5 5/7
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "val"), str(tmp_path)), nprocs=2)
    outputs = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [o["seen"] for o in outputs] == [4, 3]
    for output in outputs:
        result = output["report"]["suites"]["val"]
        assert result["count"] == 7
        assert result["top1"] == pytest.approx(400 / 7)
        assert result["top5"] == pytest.approx(500 / 7)
        assert output["report"]["settings"]["world_size"] == 2


def test_cli_writes_report_and_config(tmp_path, monkeypatch):
    write_digits_suites(tmp_path / "data")
    student = types.ModuleType("dad_core.student")
    student.load_student = lambda path, device: EncodedPredictionModel(10)
    monkeypatch.setitem(sys.modules, "dad_core.student", student)  # the real loader is another module's job
    monkeypatch.chdir(tmp_path)
    from dad_core.cli.evaluate import main

    argv = [
        "--checkpoint",
        "ckpt",
        "--output",
        "out",
        "--suite",
        "digits-val",
        "--suite",
        "digits-c",
        "-p",
        "data.root=data",
        "-p",
        "data.image_size=8",
        "-p",
        "eval.batch_size=3",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert report["clean_top1"] == pytest.approx(75.0)
    assert report["ood_mean_top1"] == pytest.approx(62.5)
    assert {"accuracy.png", "eval_report.md", "config.yaml"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "- digits-c" in (tmp_path / "out" / "config.yaml").read_text()
    assert main(["--checkpoint", "ckpt", "-p", "data.root=nowhere"]) == 2  # missing classes.txt: one-line error
