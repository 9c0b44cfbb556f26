"""DAD training on the digits: cached vs online teacher, kill-and-resume, ablations, DDP, and a student that learns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dad_core.config import load_config
from dad_core.errors import DADError
from dad_core.io import sha256_file
from dad_core.student import load_student
from dad_core.task import DADTask
from dad_core.teacher import create_clip_teacher
from dad_core.teacher_cache import cache_teacher, load_teacher_cache
from dad_core.tracking import NullTracker
from dad_core.train import fit
from dad_core.train_data import DADPairs, ResumableSampler

pytestmark = pytest.mark.slow

FAST = ["train.model=resnet10t", "train.batch_size=96", "train.epochs=1", "train.warmup_epochs=0"]


def _overrides(teacher_ckpt: Path, *extra: str) -> list[str]:
    return [f"teacher.checkpoint={teacher_ckpt}", *FAST, *extra]


@pytest.fixture(scope="module")
def dad_cache(digits_root, digits_teacher, tmp_path_factory):
    """A cache of the digits train split made with the fine-tuned tiny teacher and a pooling discretizer."""
    from conftest import PoolDiscretizer

    cfg = load_config(None, _overrides(digits_teacher))
    out = tmp_path_factory.mktemp("cache")
    teacher = create_clip_teacher(cfg.teacher.model_name, checkpoint=digits_teacher)
    cache_teacher(
        cfg,
        digits_root,
        out,
        teacher,
        PoolDiscretizer(),
        progress=False,
        teacher_checkpoint_sha256=sha256_file(digits_teacher),
    )
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from dad_core.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "model")[0]["model"]


def test_sampler_orders_are_disjoint_and_resumable():
    full = list(ResumableSampler(103, batch_size=10, rank=0, world_size=2, seed=3))
    other = list(ResumableSampler(103, batch_size=10, rank=1, world_size=2, seed=3))
    assert len(full) == len(other) == 50 and not set(full) & set(other)
    resumed = ResumableSampler(103, batch_size=10, rank=0, world_size=2, seed=3)
    resumed.set_epoch(0, start_batch=2)
    assert list(resumed) == full[20:]


def test_cached_and_online_give_the_same_loss(digits_root, digits_teacher, dad_cache):
    cfg = load_config(None, _overrides(digits_teacher))
    cache = load_teacher_cache(dad_cache, num_classes=10)
    kwargs = {"image_size": 32, "seed": 0, "replay": True, "crop_scale": (0.35, 1.0), "hflip": 0.0}
    cached = DADPairs(cache, with_teacher=True, **kwargs)
    online = DADPairs(cache, with_teacher=False, **kwargs)
    batch_c = torch.utils.data.default_collate([cached[i] for i in range(32)])
    batch_o = torch.utils.data.default_collate([online[i] for i in range(32)])
    assert torch.equal(batch_c["clean"], batch_o["clean"]) and torch.equal(batch_c["dad"], batch_o["dad"])
    from dad_core.student import create_student

    student = create_student("resnet10t", 10).eval()
    teacher = create_clip_teacher(cfg.teacher.model_name, checkpoint=digits_teacher)
    with torch.no_grad():
        loss_c = DADTask(student, cfg.loss, num_classes=10)(batch_c)
        loss_o = DADTask(student, cfg.loss, num_classes=10, teacher=teacher)(batch_o)
    for key in ("loss", "ce", "kd_clean", "kd_dad"):  # top-k = all 10 classes: only fp16 storage differs
        assert loss_c[key].item() == pytest.approx(loss_o[key].item(), rel=2e-3, abs=2e-3), key


def test_kill_and_resume_ends_with_the_same_weights(digits_root, digits_teacher, dad_cache, tmp_path):
    cfg = load_config(None, _overrides(digits_teacher, "train.checkpoint_every=4", "train.epochs=2"))
    whole = fit(cfg, digits_root, dad_cache, tmp_path / "whole", progress=False, tracker=NullTracker())
    killed = fit(
        cfg, digits_root, dad_cache, tmp_path / "killed", progress=False, tracker=NullTracker(), stop_after_steps=18
    )  # dies after step 18; the last checkpoint is from step 16
    assert killed["stopped"] and not (tmp_path / "killed" / "model").exists()
    for change, named in (("train.lr=0.5", "train.lr ("), ("train.model=resnet18", "train.model")):
        changed = load_config(None, [*_overrides(digits_teacher, "train.checkpoint_every=4", "train.epochs=2"), change])
        with pytest.raises(DADError, match=re.escape(named) + ".*--resume-changed-config"):
            fit(
                changed, digits_root, dad_cache, tmp_path / "killed", progress=False, tracker=NullTracker(), resume=True
            )
    resumed = fit(cfg, digits_root, dad_cache, tmp_path / "killed", progress=False, tracker=NullTracker(), resume=True)
    assert resumed["steps"] == whole["steps"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_never_runs_a_pickle_payload(digits_root, digits_teacher, dad_cache, tmp_path, pickle_bomb):
    cfg = load_config(None, _overrides(digits_teacher, "train.checkpoint_every=2"))
    fit(cfg, digits_root, dad_cache, tmp_path / "run", progress=False, tracker=NullTracker(), stop_after_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint"
    (checkpoint / "state.safetensors").unlink()
    pickle_bomb.write(checkpoint / "state.pt")
    with pytest.raises(DADError, match=r"state\.pt: refused"):
        fit(cfg, digits_root, dad_cache, tmp_path / "run", progress=False, tracker=NullTracker(), resume=True)
    assert not pickle_bomb.ran


@pytest.mark.parametrize("mode", ["none", "vq_only", "dad"])
def test_ablations_train(digits_root, digits_teacher, tmp_path, mode):
    from conftest import PoolDiscretizer

    cfg = load_config(None, _overrides(digits_teacher, f"attack.mode={mode}", "cache.views=1"))
    teacher = create_clip_teacher(cfg.teacher.model_name, checkpoint=digits_teacher)
    cache_teacher(
        cfg,
        digits_root,
        tmp_path / "cache",
        teacher,
        PoolDiscretizer(),
        progress=False,
        teacher_checkpoint_sha256=sha256_file(digits_teacher),
    )
    report = fit(cfg, digits_root, tmp_path / "cache", tmp_path / "run", progress=False, tracker=NullTracker())
    assert report["steps"] > 0 and ("kd_dad" in report["final"]) == (mode != "none")
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["attack_mode"] == mode


def test_mismatched_cache_is_refused(digits_root, digits_teacher, dad_cache, tmp_path):
    from dad_core.teacher_cache import CacheMismatchError

    cfg = load_config(None, _overrides(digits_teacher, "attack.eps=0.5"))
    with pytest.raises(CacheMismatchError, match="attack"):
        fit(cfg, digits_root, dad_cache, tmp_path / "run", progress=False, tracker=NullTracker())


def test_a_zero_dad_weight_keeps_dad_samples_out_of_the_student():
    from dad_core.config import LossConfig

    sizes = []
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    student.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    probs = torch.full((4, 10), 0.1)
    batch = {"clean": torch.rand(4, 3, 8, 8), "dad": torch.rand(4, 3, 8, 8), "label": torch.arange(4)}
    batch |= {"t_clean": probs, "t_dad": probs}
    out = DADTask(student, LossConfig(kd_adv_weight=0.0), num_classes=10)(batch)
    assert sizes == [4] and "kd_dad" not in out and "kd_clean" in out  # no DAD forward, not even for BatchNorm
    out = DADTask(student, LossConfig(kd_clean_weight=0.0), num_classes=10)(batch)
    assert sizes[-1] == 8 and {"kd_clean", "kd_dad"} <= set(out)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread runs ~3x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_plain_ce_trains_without_a_teacher_or_a_cache(digits_root, tmp_path, monkeypatch):
    """loss.kd_weight=0: no --cache, no teacher (even in online mode), and val_top1 is evaluate's clean top-1."""
    import dad_core.train
    from dad_core.cli.train import main
    from dad_core.evaluate import evaluate_ood

    def refuse(*args, **kwargs):
        raise AssertionError("plain CE must not load a teacher or open a teacher cache")

    monkeypatch.setattr(dad_core.train, "_build_teacher", refuse)
    monkeypatch.setattr(dad_core.train, "load_teacher_cache", refuse)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # cache.root (cache/teacher) does not exist here
    overrides = [*FAST, "train.model=test_resnet", "loss.kd_weight=0", "train.teacher_mode=online"]
    overrides.append(f"data.root={digits_root}")
    argv = ["--data-root", str(digits_root), "--output", "run", "--no-progress"]
    assert main(argv + [arg for o in overrides for arg in ("-p", o)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 1347 // 96 and set(report["final"]) == {"loss", "ce", "lr"}
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["teacher_mode"] == "none" and meta["attack_mode"] == "none"
    # One number for the clean val accuracy: training reports it with evaluate's test transform (test_resnet's
    # pretrained_cfg: crop 0.95, bilinear; it used to be crop 1.0), so it equals evaluate's digits-val top-1.
    assert report["val_transform"] == {"crop_pct": 0.95, "interpolation": "bilinear"}
    cfg = load_config(None, overrides + ["eval.suites=[digits-val]"])
    evaluated = evaluate_ood(load_student(tmp_path / "run" / "model"), cfg)
    assert report["val_top1"] == pytest.approx(evaluated["clean_top1"], abs=1e-9)


def test_training_with_a_kl_term_needs_a_cache(digits_root, tmp_path):
    from dad_core.errors import DADError

    cfg = load_config(None, FAST)
    with pytest.raises(DADError, match="needs a teacher cache"):
        fit(cfg, digits_root, None, tmp_path / "run", progress=False, tracker=NullTracker())


def test_torchrun_two_ranks_hold_identical_weights(digits_root, digits_teacher, dad_cache, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dad_core.cli.train",
        "--data-root",
        str(digits_root),
        "--cache",
        str(dad_cache),
        "--output",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    cmd += [arg for o in _overrides(digits_teacher, "train.batch_size=48") for arg in ("-p", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["ranks_in_sync"] is True
    assert report["steps"] == 1347 // (48 * 2)


def test_dad_student_beats_an_untrained_one_on_every_shifted_suite(digits_root, digits_teacher, dad_cache, tmp_path):
    from dad_core.evaluate import evaluate_ood
    from dad_core.student import create_student

    cfg = load_config(None, [f"teacher.checkpoint={digits_teacher}", "train.epochs=5", f"data.root={digits_root}"])
    fit(cfg, digits_root, dad_cache, tmp_path / "run", progress=False, tracker=NullTracker())
    trained = evaluate_ood(load_student(tmp_path / "run" / "model"), cfg)
    untrained = evaluate_ood(create_student(cfg.train.model, 10).eval(), cfg)
    ran = [name for name, suite in trained["suites"].items() if suite["status"] == "ok"]
    assert {"digits-val", "digits-c", "digits-r"} <= set(ran)
    assert trained["suites"]["digits-val"]["top1"] > 60  # ~80 after the default 10 epochs; 5 here for time
    assert trained["suites"]["digits-c"]["top1"] > untrained["suites"]["digits-c"]["top1"] + 20
    for name in ran:  # renditions (inverted, edge maps, ...) are hard for every digit model: better, not good
        assert trained["suites"][name]["top1"] > untrained["suites"][name]["top1"], name
