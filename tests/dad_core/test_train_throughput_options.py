"""Issue 15's training options end to end on the digits: ``train.replay_on_device`` trains to the same weights as
the CPU replay (also with the tensor RandAugment backend, and for plain CE's fresh views), and under
``cache.verify: lazy`` a corrupt shard stops ``fit`` naming the file (start-up reads no shard; the per-shard checks
are in test_teacher_cache.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dad_core.checkpoint import load_checkpoint
from dad_core.config import load_config
from dad_core.teacher_cache import CacheMismatchError, cache_teacher
from dad_core.tracking import NullTracker
from dad_core.train import fit

pytestmark = pytest.mark.slow

FAST = ["train.model=resnet10t", "train.batch_size=96", "train.epochs=1", "train.warmup_epochs=0", "train.hflip=0.5"]


def _cfg(*extra: str):
    return load_config(None, [*FAST, *extra])


@pytest.fixture(autouse=True)
def _own_verified_markers(tmp_path, monkeypatch):
    """Lazy verification's per-machine markers in this test's folder, not the machine's temp folder."""
    import dad_core.teacher_cache as tc

    monkeypatch.setattr(tc, "_VERIFIED_DIR", tmp_path / "verified-markers")


@pytest.fixture(scope="module")
def cache_dir(digits_root, tmp_path_factory):
    """A cache of the digits made with the conftest TinyTeacher: no teacher checkpoint, so none is compared."""
    from conftest import PoolDiscretizer, TinyTeacher

    from dad_core.teacher import freeze

    out = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    cache_teacher(_cfg(), digits_root, out, freeze(TinyTeacher(10)), PoolDiscretizer(), progress=False)
    return out


RAND_TENSOR = ("train.randaugment=rand-m9-mstd0.5-inc1", "train.randaugment_backend=tensor")


@pytest.fixture(scope="module")
def randaugment_cache_dir(digits_root, tmp_path_factory):
    """The same cache, its views scored with the tensor RandAugment backend."""
    from conftest import PoolDiscretizer, TinyTeacher

    from dad_core.teacher import freeze

    out = tmp_path_factory.mktemp("cache-randaugment")
    torch.manual_seed(0)
    cache_teacher(_cfg(*RAND_TENSOR), digits_root, out, freeze(TinyTeacher(10)), PoolDiscretizer(), progress=False)
    return out


@pytest.mark.parametrize("randaugment", [False, True])
def test_replay_on_device_trains_to_the_weights_of_the_cpu_replay(
    digits_root, randaugment, request, tmp_path, monkeypatch
):
    import dad_core.train

    cache_dir = request.getfixturevalue("randaugment_cache_dir" if randaugment else "cache_dir")
    extra = RAND_TENSOR if randaugment else ()
    reports, weights, kept_on_host = {}, {}, []
    to_device = dad_core.train._to_device

    def to_device_spy(batch, dev, channels_last, host_keys=()):
        kept_on_host.append(sorted(key for key in host_keys if key in batch))
        return to_device(batch, dev, channels_last, host_keys)

    monkeypatch.setattr(dad_core.train, "_to_device", to_device_spy)
    for on_device in (False, True):
        cfg = _cfg(f"train.replay_on_device={str(on_device).lower()}", *extra)
        run = tmp_path / str(on_device)
        reports[on_device] = fit(cfg, digits_root, cache_dir, run, progress=False, tracker=NullTracker())
        weights[on_device] = load_checkpoint(run / "model")[0]["model"]

    assert reports[True]["steps"] == reports[False]["steps"] > 10
    # the loop keeps the view rows (and the loader's RandAugment draws) on the host for the replay
    assert (["randaugment", "view"] if randaugment else ["view"]) in kept_on_host
    assert reports[True]["final"]["loss"] == pytest.approx(reports[False]["final"]["loss"], rel=1e-4)
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_plain_ce_replays_on_device_to_the_weights_of_the_loader(digits_root, tmp_path, monkeypatch):
    """Plain CE (no teacher, no cache) makes its fresh views in the training step too, with the same result."""
    import dad_core.train

    weights, replayed = {}, []
    replay = dad_core.train.replay_views

    def replay_spy(batch, *args, **kwargs):
        replayed.append("view" in batch)
        return replay(batch, *args, **kwargs)

    monkeypatch.setattr(dad_core.train, "replay_views", replay_spy)
    for on_device in (False, True):
        replayed.clear()
        cfg = _cfg(f"train.replay_on_device={str(on_device).lower()}", "loss.kd_weight=0", *RAND_TENSOR)
        fit(cfg, digits_root, None, tmp_path / str(on_device), progress=False, tracker=NullTracker())
        weights[on_device] = load_checkpoint(tmp_path / str(on_device) / "model")[0]["model"]
        assert replayed and all(replayed) == on_device  # the step made the views, or the loader did
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_corrupt_shard_stops_training_naming_the_file(digits_root, cache_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard = cache / "shard-00003.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(CacheMismatchError, match=r"shard-00003\.pt: checksum mismatch"):
        fit(_cfg(), digits_root, cache, tmp_path / "run", progress=False, tracker=NullTracker())


def test_the_view_rows_stay_on_the_host_while_the_batch_goes_to_the_device():
    """The replay reads the view rows on the host: sent to the GPU, reading them back would wait for the last step."""
    from dad_core.train import _to_device

    batch = {"clean": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "view": torch.zeros(2, 6, dtype=torch.long)}
    moved = _to_device(batch, torch.device("meta"), False, host_keys=("view",))

    assert moved["clean"].device.type == "meta" and moved["view"] is batch["view"]
