"""The teacher cache (dad_core.teacher_cache): explicit labels that folder order cannot scramble, stored pixels and
soft labels that match the teacher, sharding across workers, resume after a kill, and refusal of a cache made from
other inputs (DESIGN 3.3, 3.5, 7; dad_method.md 1.7 item 1)."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _folders import write_numbered_folders
from PIL import Image

from dad_core.config import load_config
from dad_core.data import BadImageError, create_eval_transform, load_image, read_classes
from dad_core.io import sha256_file
from dad_core.losses import soften
from dad_core.prepare import prepare_folder
from dad_core.teacher import freeze
from dad_core.teacher_cache import (
    CacheMismatchError,
    cache_dependencies,
    cache_teacher,
    dataset_hash,
    expand_topk,
    load_teacher_cache,
    open_split,
)
from dad_core.views import apply_view

NUMBERED_CLASSES = 12  # folders "0".."11": lexicographic order ("0", "1", "10", "11", "2", ...) is not class order
TEACHER_SHA = "ab" * 32


def _teacher(num_classes: int):
    """The conftest TinyTeacher with its head scaled up, so that soft labels at T=4 are far from uniform."""
    from conftest import TinyTeacher

    torch.manual_seed(0)
    model = TinyTeacher(num_classes)
    with torch.no_grad():
        model.fc.weight.mul_(50)
    return freeze(model)


def _pool():
    from conftest import PoolDiscretizer

    return PoolDiscretizer()


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("shard-*.pt"))


# --- the embedded digits, all of them ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(digits_root, tmp_path_factory):
    cfg = load_config(None, ["cache.shard_size=200"])
    teacher = _teacher(10)
    out = tmp_path_factory.mktemp("digits-cache")
    report = cache_teacher(cfg, digits_root, out, teacher, _pool(), progress=False)
    return cfg, out, teacher, report


def test_labels_are_the_source_labels_for_every_sample(digits_root, digits_cache):
    from sklearn.datasets import load_digits

    _, out, _, report = digits_cache
    source = open_split(digits_root, "train")
    assert report["complete"] and report["total_shards"] == math.ceil(len(source) / 200) > 2
    cache = load_teacher_cache(out, num_classes=10)
    labels = cache.labels().tolist()
    assert len(cache) == len(labels) == len(source) == 1347
    assert labels == source.targets
    sklearn_labels = load_digits().target
    for i, (rel, _) in enumerate(source.samples):  # train/<id>/<row of load_digits():04d>.png
        folder, name = rel.split("/")
        assert labels[i] == sklearn_labels[int(Path(name).stem)] == int(folder), rel
        shard, offset = cache.item(i)
        assert int(shard["indices"][offset]) == i and int(shard["labels"][offset]) == labels[i]
    assert sorted(set(labels)) == list(range(10))


def test_stored_clean_images_are_the_no_aug_transform_of_the_source(digits_root, digits_cache):
    cfg, out, _, _ = digits_cache
    cache = load_teacher_cache(out, num_classes=10)
    source = open_split(digits_root, "train", create_eval_transform(cfg.data.image_size))
    for i in range(0, len(source), 7):
        image, _ = source[i]
        shard, offset = cache.item(i)
        stored = shard["clean"][offset]
        assert stored.dtype == torch.uint8 and stored.shape == (3, 32, 32)
        assert torch.equal(stored, (image * 255).round().to(torch.uint8)), i
    # at the prepared size the no-aug transform is the identity: the stored pixels are the PNG's
    path = source.root / source.samples[5][0]
    assert np.array_equal(cache.item(5)[0]["clean"][5].permute(1, 2, 0).numpy(), np.asarray(load_image(path)))


def test_dad_samples_differ_from_clean_but_stay_close(digits_cache):
    cfg, out, _, _ = digits_cache
    cache = load_teacher_cache(out, num_classes=10)
    clean = torch.cat([cache.shard(i)["clean"] for i in range(cache.manifest["num_shards"])]).float() / 255
    dad = torch.cat([cache.shard(i)["dad"] for i in range(cache.manifest["num_shards"])]).float() / 255
    mse = (dad - clean).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse)
    assert bool((mse > 0).all())  # every DAD sample differs from its clean image...
    assert float(psnr.min()) > 20 and float(psnr.max()) < 40  # ...but stays close (the stub pools 2x2)
    # DAD = VQ(x0 + delta) with ||delta||_2 <= eps around x0 = VQ(x); the stub is a projection (no growth) that
    # rounds to 8 bits, so each sample is within eps plus half a gray level per value of x0.
    x0 = _pool().reconstruct(clean)
    dist = (dad - x0).flatten(1).norm(dim=1)
    rounding = math.sqrt(clean[0].numel()) * 0.5 / 255
    assert float(dist.max()) <= cfg.attack.eps + rounding + 1e-6
    assert float((dist > 0).float().mean()) > 0.5  # the attack moved most samples off VQ(x)


@torch.no_grad()
def test_soft_labels_are_the_teachers_probabilities_on_the_stored_pixels_and_views(digits_cache):
    cfg, out, teacher, _ = digits_cache
    cache = load_teacher_cache(out, num_classes=10)
    T = cfg.loss.temperature
    assert cache.manifest["views"]["temperature"] == T == 4.0
    assert cache.views == cfg.cache.views == 2 and cfg.cache.topk == 10  # k = C: expand_topk is exact
    for shard_id in (0, cache.manifest["num_shards"] - 1):
        shard = cache.shard(shard_id)
        for name in ("clean", "dad"):
            logits = teacher(shard[name].float() / 255)
            want = soften(logits, T)
            have = torch.stack([cache.probs(shard, j, name) for j in range(len(shard["labels"]))])
            torch.testing.assert_close(have, want, atol=1e-3, rtol=0)  # fp16 storage
            assert not torch.allclose(have, soften(logits, 1.0), atol=1e-2)  # the temperature matters
            assert float(want.max(1).values.mean()) > 0.15  # well above uniform (0.1): the check has teeth
            for r in range(cache.views):
                views = torch.stack(
                    [
                        apply_view(
                            shard[name][j], shard["views"][j, r], cfg.data.image_size, randaugment=cfg.train.randaugment
                        )
                        for j in range(len(shard["labels"]))
                    ]
                )
                have = torch.stack([cache.probs(shard, j, name, view=r) for j in range(len(shard["labels"]))])
                torch.testing.assert_close(have, soften(teacher(views), T), atol=1e-3, rtol=0)
        assert not torch.equal(shard["view_clean_topv"][:, 0], shard["view_clean_topv"][:, 1])  # two different views


def test_expand_topk_is_exact_for_all_classes_and_spreads_the_rest_otherwise():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(6, 10, generator=gen), dim=-1)
    values, indices = probs.topk(10, dim=-1)
    torch.testing.assert_close(expand_topk(values, indices, 10), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(expand_topk(values.half(), indices.to(torch.int16), 10), probs, atol=1e-3, rtol=0)
    for k in (1, 3, 9):
        values, indices = probs.topk(k, dim=-1)
        full = expand_topk(values, indices, 10)
        torch.testing.assert_close(full.sum(-1), torch.ones(6), atol=1e-6, rtol=0)
        torch.testing.assert_close(full.gather(-1, indices), values, atol=1e-6, rtol=0)
        rest = (1 - values.sum(-1, keepdim=True)) / (10 - k)
        others = torch.ones_like(full, dtype=torch.bool).scatter_(-1, indices, False)
        torch.testing.assert_close(full[others].view(6, 10 - k), rest.expand(6, 10 - k), atol=1e-6, rtol=0)
        assert torch.equal(full.topk(k, dim=-1).indices.sort(-1).values, indices.sort(-1).values)


def test_a_truncated_png_fails_caching_naming_the_file(digits_root, tmp_path):
    data = tmp_path / "digits"
    data.mkdir()
    for name in ("classes.txt", "manifest.json"):
        shutil.copy2(digits_root / name, data / name)
    shutil.copytree(digits_root / "train", data / "train")
    rel = open_split(data, "train").samples[7][0]
    bad = data / "train" / rel
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = load_config(None, ["cache.shard_size=50", "cache.views=0"])
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        cache_teacher(cfg, data, tmp_path / "cache", _teacher(10), _pool(), progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not _shards(tmp_path / "cache")


# --- a folder dataset with 12 numbered classes (the ImageFolder sort-order trap) -------------------------------


@pytest.fixture(scope="module")
def numbered_root(tmp_path_factory):
    """``train/<k>/img<j>.png`` for k in 0..11, classes.txt in numeric order; pixel block [0:4, 0:4] = 20 * k."""
    base = tmp_path_factory.mktemp("numbered")
    source = write_numbered_folders(base / "src", NUMBERED_CLASSES, train_per_class=12, block=4, class_names=False)
    prepare_folder(source, base / "data", load_config(None, []).data, progress=False)
    return base / "data"


def _numbered_cfg(*extra: str):
    return load_config(None, ["cache.shard_size=25", "cache.topk=5", "cache.batch_size=16", *extra])


def _cache_numbered(root: Path, out: Path, *extra: str, **kwargs):
    return cache_teacher(
        _numbered_cfg(*extra),
        root,
        out,
        _teacher(NUMBERED_CLASSES),
        _pool(),
        progress=False,
        teacher_checkpoint_sha256=TEACHER_SHA,
        **kwargs,
    )


@pytest.fixture(scope="module")
def numbered_cache(numbered_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("numbered-cache")
    return out, _cache_numbered(numbered_root, out)


def test_numbered_folders_keep_their_labels(numbered_root, numbered_cache):
    out, report = numbered_cache
    ids = read_classes(numbered_root / "classes.txt").ids
    assert sorted(ids) != list(ids)  # the trap is armed: sort order is not class order
    assert report["complete"] and report["total_shards"] == 6 and report["images"] == 144
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    source = open_split(numbered_root, "train")
    labels = cache.labels()
    assert labels.tolist() == source.targets == [int(rel.split("/")[0]) for rel, _ in source.samples]
    clean = torch.cat([cache.shard(i)["clean"] for i in range(6)])
    assert torch.equal(clean[:, :, :4, :4].float().mean((1, 2, 3)), 20.0 * labels.float())  # the pixels agree
    assert torch.bincount(labels).tolist() == [12] * NUMBERED_CLASSES


@torch.no_grad()
def test_top_k_soft_labels_hold_the_teachers_k_largest_probabilities(numbered_cache):
    out, _ = numbered_cache
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    shard = cache.shard(1)
    want = soften(_teacher(NUMBERED_CLASSES)(shard["dad"].float() / 255), 4.0)
    top = want.topk(5, dim=-1)
    assert shard["dad_topv"].dtype == torch.float16 and shard["dad_topv"].shape == (25, 5)
    torch.testing.assert_close(shard["dad_topv"].float(), top.values, atol=1e-3, rtol=0)
    assert torch.equal(shard["dad_topi"].long(), top.indices)
    full = cache.probs(shard, 3, "dad")
    assert full.shape == (NUMBERED_CLASSES,) and abs(float(full.sum()) - 1) < 1e-5


def test_two_workers_make_the_same_cache_as_one(numbered_root, numbered_cache, tmp_path):
    single, _ = numbered_cache
    out = tmp_path / "cache"
    first = _cache_numbered(numbered_root, out, shard_index=0, num_shards=2)
    assert first["shards_written"] == [0, 2, 4] and not first["complete"] and first["manifest_sha256"] is None
    assert not (out / "manifest.json").exists() and not (out / "samples.png").exists()
    with pytest.raises(CacheMismatchError, match="incomplete"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    second = _cache_numbered(numbered_root, out, shard_index=1, num_shards=2)
    assert second["shards_written"] == [1, 3, 5] and second["complete"]
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES, verify="full")  # every checksum
    shards = cache.manifest["shards"]
    assert sorted(shards) == [f"shard-{i:05d}" for i in range(6)] and cache.manifest["num_samples"] == 144
    for name, info in shards.items():
        assert info["sha256"] == sha256_file(out / f"{name}.pt")
    # seeds are per shard, not per worker: the same bytes as the single-worker run
    assert [p.name for p in _shards(out)] == [p.name for p in _shards(single)]
    for path in _shards(single):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
        sidecar = path.with_suffix(".json")
        assert (out / sidecar.name).read_bytes() == sidecar.read_bytes()
    assert (out / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    with Image.open(out / "samples.png") as grid:
        assert grid.size[0] > grid.size[1] > 0


def _kill_data(path: Path) -> None:
    path.unlink()


def _kill_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_kill_data, _kill_sidecar, _truncate, _flip_a_byte])
def test_rerun_rewrites_only_the_damaged_shard(numbered_root, numbered_cache, tmp_path, damage):
    single, _ = numbered_cache
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    target = out / "shard-00003.pt"
    damage(target)
    (out / ".shard-00003.pt.x1y2z3.tmp").write_bytes(b"half a shard")  # what a SIGKILL mid-write leaves
    report = _cache_numbered(numbered_root, out)
    assert report["shards_written"] == [3] and report["shards_skipped"] == [0, 1, 2, 4, 5] and report["complete"]
    assert target.read_bytes() == (single / target.name).read_bytes()
    assert (out / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    load_teacher_cache(out, num_classes=NUMBERED_CLASSES)


def test_a_run_killed_mid_shard_resumes_from_that_shard(numbered_root, numbered_cache, tmp_path, monkeypatch):
    import dad_core.teacher_cache as tc

    single, _ = numbered_cache
    out = tmp_path / "cache"
    save = tc.save_torch

    def dying_save(shard, path):
        if int(shard["indices"][0]) == 3 * 25:
            raise KeyboardInterrupt  # killed while writing shard 3 (the atomic write leaves no partial file)
        return save(shard, path)

    monkeypatch.setattr(tc, "save_torch", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _cache_numbered(numbered_root, out)
    assert sorted(p.name for p in _shards(out)) == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(tc, "save_torch", save)
    report = _cache_numbered(numbered_root, out)
    assert report["shards_written"] == [3, 4, 5] and report["shards_skipped"] == [0, 1, 2] and report["complete"]
    for path in _shards(single):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_load_refuses_a_cache_made_from_other_inputs(numbered_root, numbered_cache):
    out, _ = numbered_cache

    def expected(*overrides: str, dataset: str | None = None, teacher_sha: str = TEACHER_SHA):
        return cache_dependencies(
            _numbered_cfg(*overrides),
            dataset=dataset or dataset_hash(numbered_root),
            teacher_checkpoint_sha256=teacher_sha,
            vqgan_checkpoint_sha256=None,
        )

    assert len(load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=expected())) == 144
    cases = [
        (expected("attack.eps=0.2"), r"attack differs in \['eps'\]"),
        (expected(teacher_sha="cd" * 32), r"teacher differs in \['checkpoint_sha256'\]"),
        (expected(dataset="0" * 64), "dataset_hash"),
        (expected("cache.views=3"), r"views differs in \['views'\]"),
        (expected("vqgan.precision=bf16"), r"vqgan differs in \['precision'\]"),  # bf16 moves DAD pixels
    ]
    for want, message in cases:
        with pytest.raises(CacheMismatchError, match=message):
            load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want)


def test_a_seed_mismatch_names_cache_seed_both_values_and_the_fix(numbered_root, numbered_cache):
    out, _ = numbered_cache
    want = cache_dependencies(
        _numbered_cfg("cache.seed=7"),
        dataset=dataset_hash(numbered_root),
        teacher_checkpoint_sha256=TEACHER_SHA,
        vqgan_checkpoint_sha256=None,
    )
    with pytest.raises(CacheMismatchError) as err:
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want)
    message = str(err.value)
    assert "cache.seed: 0 in the cache, 7 in the config" in message
    assert "pass -p cache.seed=0 to train on this cache" in message
    assert "rebuild the cache (dad cache-teacher -p cache.seed=7)" in message


def test_writing_into_a_cache_made_from_other_inputs_raises(numbered_root, numbered_cache, tmp_path):
    single, _ = numbered_cache
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CacheMismatchError, match="differs in: attack"):
        _cache_numbered(numbered_root, out, "attack.eps=0.2")
    with pytest.raises(CacheMismatchError, match="differs in: teacher"):
        cache_teacher(
            _numbered_cfg(),
            numbered_root,
            out,
            _teacher(NUMBERED_CLASSES),
            _pool(),
            progress=False,
            teacher_checkpoint_sha256="cd" * 32,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was touched


@pytest.mark.parametrize(
    ("damage", "verify", "message"),
    [
        (_flip_a_byte, "full", "checksum mismatch"),
        (_kill_data, "lazy", "missing"),  # up front in every mode: a stat per shard
        (_kill_data, "none", "missing"),
        (_truncate, "lazy", r"\d+ bytes, its sidecar says \d+"),
    ],
)
def test_a_damaged_shard_fails_verification_naming_the_file(numbered_cache, tmp_path, damage, verify, message):
    single, _ = numbered_cache
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    damage(out / "shard-00004.pt")
    with pytest.raises(CacheMismatchError, match=rf"shard-00004\.pt: {message}"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, verify=verify)


@pytest.fixture(autouse=True)
def _own_verified_markers(tmp_path, monkeypatch):
    """Lazy verification's per-machine markers in this test's folder, not the machine's temp folder."""
    import dad_core.teacher_cache as tc

    monkeypatch.setattr(tc, "_VERIFIED_DIR", tmp_path / "verified-markers")


def _hash_spy(monkeypatch) -> list[str]:
    """Record the name of every file ``dad_core.teacher_cache`` hashes (still hashing it)."""
    import dad_core.teacher_cache as tc

    hashed: list[str] = []

    def spy(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(tc, "sha256_file", spy)
    return hashed


def test_lazy_open_reads_no_shard_and_a_corrupt_one_stops_the_loader_naming_it(numbered_cache, tmp_path, monkeypatch):
    from dad_core.train_data import DADPairs

    single, _ = numbered_cache
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    _flip_a_byte(out / "shard-00004.pt")
    hashed = _hash_spy(monkeypatch)

    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)  # start-up: succeeds, hashes nothing

    assert hashed == []
    pairs = DADPairs(cache, image_size=16, seed=0, replay=True, with_teacher=True, crop_scale=(0.35, 1.0), hflip=0.5)
    for index in (0, 1, 24, 25, 99):  # shards 0, 0, 0, 1, 3: each hashed once, when first opened
        pairs[index]
    assert hashed == ["shard-00000.pt", "shard-00001.pt", "shard-00003.pt"]
    with pytest.raises(CacheMismatchError, match=r"shard-00004\.pt: checksum mismatch"):
        pairs[100]
    assert 4 not in cache._shards  # never loaded: a retry raises again
    # another process on this machine (a loader worker of the next epoch) trusts the verified files' markers
    again = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    again.shard(0), again.shard(1)
    with pytest.raises(CacheMismatchError, match=r"shard-00004\.pt"):
        again.shard(4)
    assert hashed == ["shard-00000.pt", "shard-00001.pt", "shard-00003.pt", "shard-00004.pt", "shard-00004.pt"]
    # a file changed after it was verified has no marker: hashed again
    _flip_a_byte(out / "shard-00000.pt")
    with pytest.raises(CacheMismatchError, match=r"shard-00000\.pt"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES).shard(0)


def test_a_corrupt_shard_stops_multi_worker_loading_naming_the_file(numbered_cache, tmp_path):
    from torch.utils.data import DataLoader

    from dad_core.train_data import DADPairs

    single, _ = numbered_cache
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    _flip_a_byte(out / "shard-00004.pt")
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    pairs = DADPairs(cache, image_size=16, seed=0, replay=True, with_teacher=True, crop_scale=(0.35, 1.0), hflip=0.5)
    loader = DataLoader(pairs, batch_size=25, num_workers=2)  # each worker opens (and hashes) its shards itself

    with pytest.raises(CacheMismatchError, match=r"shard-00004\.pt: checksum mismatch"):
        for _ in loader:
            pass


@pytest.mark.parametrize("online", [False, True])  # replay a stored view | draw a fresh one (teacher_mode online)
def test_device_replay_gives_the_cpu_replays_views_and_pixels(numbered_cache, online):
    from torch.utils.data import default_collate

    from dad_core.train_data import DADPairs, replay_views
    from dad_core.views import sample_view

    out, _ = numbered_cache
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    kwargs = dict(image_size=16, seed=3, replay=not online, with_teacher=not online, crop_scale=(0.2, 1.0), hflip=0.5)
    on_cpu, on_device = DADPairs(cache, **kwargs), DADPairs(cache, replay_on_device=True, **kwargs)
    on_cpu.set_epoch(2)
    on_device.set_epoch(2)
    indices = [0, 5, 30, 77, 143]

    items = [on_device[i] for i in indices]

    for index, item in zip(indices, items, strict=True):  # the view is drawn exactly as the CPU path draws it
        shard, offset = cache.item(index)
        rng = np.random.default_rng([3, 2, index])
        if online:
            v = sample_view(*shard["clean"].shape[-2:], rng, scale=(0.2, 1.0), hflip=0.5)
            want = torch.tensor([v.top, v.left, v.height, v.width, int(v.flip), v.seed])
        else:
            want = shard["views"][offset, int(rng.integers(0, cache.views))]
        assert torch.equal(item["view"], want)
        assert item["clean"].dtype == torch.uint8 and torch.equal(item["clean"], shard["clean"][offset])
    flips = [int(item["view"][4]) for item in items]  # the stored views were drawn with train.hflip 0
    assert (0 < sum(flips) < len(flips)) if online else sum(flips) == 0
    device_batch = replay_views(default_collate(items), 16)
    cpu_batch = default_collate([on_cpu[i] for i in indices])
    assert device_batch.keys() == cpu_batch.keys()
    for key, value in cpu_batch.items():  # on a CPU the same ops: equal (a GPU's kernels round differently)
        torch.testing.assert_close(device_batch[key], value, atol=1e-6, rtol=0)


def test_device_replay_falls_back_to_the_cpu_with_pil_randaugment(numbered_cache):
    from dad_core.train_data import DADPairs

    cache = load_teacher_cache(numbered_cache[0], num_classes=NUMBERED_CLASSES)
    kwargs = dict(image_size=16, seed=0, replay=True, with_teacher=True, crop_scale=(0.35, 1.0), hflip=0.5)
    pairs = DADPairs(cache, replay_on_device=True, randaugment="rand-m9-mstd0.5-inc1", **kwargs)
    assert not pairs.on_device and "view" not in pairs[0] and pairs[0]["clean"].dtype == torch.float32
    tensor = DADPairs(
        cache, replay_on_device=True, randaugment="rand-m9-mstd0.5-inc1", randaugment_backend="tensor", **kwargs
    )
    assert tensor.on_device and "view" in tensor[0] and tensor[0]["clean"].dtype == torch.uint8


RAND_TENSOR = ("train.randaugment=rand-m9-mstd0.5-inc1", "train.randaugment_backend=tensor")


@torch.no_grad()
def test_tensor_randaugment_views_are_scored_as_the_device_replays_them(numbered_root, tmp_path):
    """The cache scores each stored view with the tensor backend's RandAugment on it; training replays exactly those
    pixels, on the device (replay_views) as in the loader (DADPairs)."""
    from torch.utils.data import default_collate

    from dad_core.randaugment import encode_ops
    from dad_core.train_data import DADPairs, replay_views

    cfg = _numbered_cfg(*RAND_TENSOR)
    _cache_numbered(numbered_root, tmp_path / "cache", *RAND_TENSOR)
    cache = load_teacher_cache(tmp_path / "cache", num_classes=NUMBERED_CLASSES)
    assert cache.manifest["views"]["randaugment_backend"] == "tensor"
    shard, teacher, size = cache.shard(1), _teacher(NUMBERED_CLASSES), cfg.data.image_size
    for r in range(cache.views):
        views = torch.stack(
            [
                apply_view(
                    shard["dad"][j], shard["views"][j, r], size, randaugment=cfg.train.randaugment, backend="tensor"
                )
                for j in range(len(shard["labels"]))
            ]
        )
        top = soften(teacher(views), cfg.loss.temperature).topk(cfg.cache.topk, dim=-1)  # top-5 of 12 classes
        torch.testing.assert_close(shard["view_dad_topv"][:, r].float(), top.values, atol=1e-3, rtol=0)
        assert torch.equal(shard["view_dad_topi"][:, r].long(), top.indices)
    plain = apply_view(shard["dad"][0], shard["views"][0, 0], size)
    assert not torch.equal(views[0], plain)  # RandAugment did change the scored pixels

    kwargs = dict(image_size=size, seed=1, replay=True, with_teacher=True, crop_scale=cfg.train.crop_scale, hflip=0.0)
    kwargs.update(randaugment=cfg.train.randaugment, randaugment_backend="tensor")
    on_cpu, on_device = DADPairs(cache, **kwargs), DADPairs(cache, replay_on_device=True, **kwargs)
    indices = [0, 7, 30, 99, 140]
    item = on_device[7]  # the loader draws the view's RandAugment; the step only applies it
    assert torch.equal(item["randaugment"], encode_ops(int(item["view"][5]), cfg.train.randaugment))
    device_batch = replay_views(
        default_collate([on_device[i] for i in indices]), size, randaugment=cfg.train.randaugment
    )
    cpu_batch = default_collate([on_cpu[i] for i in indices])
    assert device_batch.keys() == cpu_batch.keys()
    for key, value in cpu_batch.items():
        torch.testing.assert_close(device_batch[key], value, atol=1e-6, rtol=0)


def test_without_stored_views_the_device_replay_adds_no_randaugment(numbered_root, tmp_path):
    """No views (cache.views 0): the whole image and its stored soft labels, as the CPU path uses them."""
    from torch.utils.data import default_collate

    from dad_core.train_data import DADPairs, replay_views

    _cache_numbered(numbered_root, tmp_path / "cache", "cache.views=0")
    cache = load_teacher_cache(tmp_path / "cache", num_classes=NUMBERED_CLASSES)
    kwargs = dict(image_size=32, seed=0, replay=True, with_teacher=True, crop_scale=(0.35, 1.0), hflip=0.0)
    kwargs.update(randaugment="rand-m9-n3-p1.0", randaugment_backend="tensor")  # every layer applies an op
    on_cpu, on_device = DADPairs(cache, **kwargs), DADPairs(cache, replay_on_device=True, **kwargs)
    indices = [0, 9, 50]

    device_batch = replay_views(default_collate([on_device[i] for i in indices]), 32, randaugment="rand-m9-n3-p1.0")

    cpu_batch = default_collate([on_cpu[i] for i in indices])
    for key, value in cpu_batch.items():
        torch.testing.assert_close(device_batch[key], value, atol=1e-6, rtol=0)
    stored = cache.shard(0)["clean"][[0, 9]]  # the numbered images are stored at 32 px: the pixels themselves
    assert torch.equal((device_batch["clean"][:2] * 255).round().to(torch.uint8), stored)


def test_a_cache_is_read_with_the_randaugment_backend_it_was_made_with(numbered_cache, tmp_path):
    import json

    out = tmp_path / "cache"
    shutil.copytree(numbered_cache[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    views = {**manifest["views"], "randaugment": "rand-m9-mstd0.5-inc1", "randaugment_backend": "pil"}
    (out / "manifest.json").write_text(json.dumps({**manifest, "views": views}))
    want_tensor = {"views": {**views, "randaugment_backend": "tensor"}}

    with pytest.raises(CacheMismatchError, match="train.randaugment_backend: 'pil' in the cache, 'tensor' in the"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want_tensor)
    load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected={"views": views})
    # a cache written before the backend was recorded was made with timm's PIL ops
    older = {key: value for key, value in views.items() if key != "randaugment_backend"}
    (out / "manifest.json").write_text(json.dumps({**manifest, "views": older}))
    load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected={"views": views})
    with pytest.raises(CacheMismatchError, match="randaugment_backend"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want_tensor)
    # a cache without RandAugment: the message names train.randaugment alone (no backend to pass for none)
    (out / "manifest.json").write_text(json.dumps({**manifest, "views": {**older, "randaugment": ""}}))
    with pytest.raises(CacheMismatchError, match="randaugment") as err:
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want_tensor)
    assert "pass -p train.randaugment='' to train" in str(err.value) and "backend" not in str(err.value)


def test_a_cache_half_written_before_the_backend_was_recorded_resumes(numbered_root, numbered_cache, tmp_path):
    import json

    out = tmp_path / "cache"
    shutil.copytree(numbered_cache[0], out)
    deps = json.loads((out / "deps.json").read_text())
    assert deps["views"].pop("randaugment_backend") is None  # as an older version wrote it
    (out / "deps.json").write_text(json.dumps(deps))
    for path in (out / "manifest.json", out / "shard-00005.pt", out / "shard-00005.json"):
        path.unlink()

    report = _cache_numbered(numbered_root, out)

    assert report["shards_written"] == [5] and report["complete"]


def test_full_verification_hashes_every_shard_up_front_once(numbered_cache, monkeypatch):
    out, _ = numbered_cache
    hashed = _hash_spy(monkeypatch)

    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES, verify="full")
    cache.shard(2)

    assert sorted(hashed) == [f"shard-{i:05d}.pt" for i in range(6)]  # opening a shard later hashes nothing more
    with pytest.raises(ValueError, match="'sometimes'"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, verify="sometimes")


def test_a_cache_without_manifest_is_incomplete(tmp_path):
    with pytest.raises(CacheMismatchError, match="incomplete"):
        load_teacher_cache(tmp_path, num_classes=10)


# --- attack-survival diagnostics, samples.png, attack.space ---------------------------------------------------


SURVIVAL_KEYS = {"images", "top1_clean", "top1_vq", "top1_attacked", "top1_dad", "codes_changed", "pixel_change_255"}


def _check_survival(metrics: dict, images: int, *, codes: bool) -> None:
    assert set(metrics) == SURVIVAL_KEYS and metrics["images"] == images
    for key in ("top1_clean", "top1_vq", "top1_attacked", "top1_dad"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= metrics["pixel_change_255"] <= 255.0
    assert (0.0 <= metrics["codes_changed"] <= 1.0) if codes else metrics["codes_changed"] is None


def test_survival_diagnostics_per_shard_in_the_report_and_weighted_in_the_manifest(numbered_cache):
    from dad_core.teacher_cache import DIAGNOSTIC_IMAGES

    out, report = numbered_cache
    manifest = load_teacher_cache(out, num_classes=NUMBERED_CLASSES).manifest
    per_shard = [info["diagnostics"] for info in manifest["shards"].values()]
    diagnosed = min(DIAGNOSTIC_IMAGES, 16)  # the first batch (cache.batch_size=16) of each shard, not every image
    for metrics in per_shard:
        _check_survival(metrics, diagnosed, codes=False)  # the pooling stub has no code indices
    assert [{k: v for k, v in d.items() if k != "shard"} for d in report["shard_diagnostics"]] == per_shard
    assert [d["shard"] for d in report["shard_diagnostics"]] == list(range(6))
    assert report["diagnostics"] == report["cache_diagnostics"] == manifest["diagnostics"]  # one worker: all shards
    _check_survival(manifest["diagnostics"], 6 * diagnosed, codes=False)
    for key in ("top1_clean", "top1_dad", "pixel_change_255"):
        assert manifest["diagnostics"][key] == pytest.approx(np.mean([d[key] for d in per_shard]))
    assert manifest["diagnostics"]["pixel_change_255"] > 0  # the attack moved the samples


def test_aggregate_diagnostics_weighs_by_images_and_skips_missing_values():
    from dad_core.teacher_cache import aggregate_diagnostics

    shards = [
        {"images": 30, "top1_dad": 1.0, "codes_changed": None},
        {"images": 10, "top1_dad": 0.0, "codes_changed": 0.5},
        None,  # a shard without diagnostics
    ]
    assert aggregate_diagnostics(shards) == {"images": 40, "top1_dad": 0.75, "codes_changed": 0.5}
    assert aggregate_diagnostics([None, {}]) == {}


@torch.no_grad()
def test_samples_png_is_a_four_column_grid_of_previews_with_the_teachers_predictions(numbered_cache):
    out, _ = numbered_cache
    cache = load_teacher_cache(out, num_classes=NUMBERED_CLASSES)
    teacher, pool = _teacher(NUMBERED_CLASSES), _pool()
    shard = cache.shard(2)
    p = len(shard["preview_pred"])
    assert p == 8 and shard["preview_vq"].shape == shard["preview_reference"].shape == (p, 3, 32, 32)
    clean = shard["clean"][:p].float() / 255
    x0 = pool.reconstruct(clean)
    assert torch.equal(shard["preview_vq"], (x0 * 255).round().to(torch.uint8))
    assert torch.equal(shard["preview_reference"], (pool.reconstruct(x0) * 255).round().to(torch.uint8))
    assert shard["preview_pred"][:, 0].tolist() == teacher(clean).argmax(1).tolist()
    assert shard["preview_pred"][:, 1].tolist() == teacher(x0).argmax(1).tolist()
    with Image.open(out / "samples.png") as grid:
        grid.load()
        # 8 rows in two panels of clean | VQ(x) | DAD | difference, 32-px images upscaled to 128 px
        assert grid.mode == "RGB" and grid.size[0] > 8 * 128 and 4 * 128 < grid.size[1] < grid.size[0]
        pixels = np.asarray(grid)
    assert (pixels == 0).all(axis=2).mean() > 0.05 and (pixels == 255).all(axis=2).mean() > 0.05  # text and tiles


def test_attack_space_is_a_cache_dependency(numbered_root, numbered_cache):
    out, _ = numbered_cache
    want = cache_dependencies(
        _numbered_cfg("attack.space=latent"),
        dataset=dataset_hash(numbered_root),
        teacher_checkpoint_sha256=TEACHER_SHA,
        vqgan_checkpoint_sha256=None,
    )
    assert want["attack"]["space"] == "latent"
    assert load_teacher_cache(out, num_classes=NUMBERED_CLASSES).manifest["attack"]["space"] == "pixel"
    with pytest.raises(CacheMismatchError, match=r"attack differs in \['space'\]"):
        load_teacher_cache(out, num_classes=NUMBERED_CLASSES, expected=want)


def _tiny_vqgan():
    """tests/dad_core/test_attack.py's toy VQGAN: random tiny-f4 with a codebook sampled from its own latents."""
    from dad_core.vqgan import VQGAN

    torch.manual_seed(0)
    model = VQGAN.from_config("tiny-f4").eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(8, 3, 32, 32) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 8)
        model.codebook.weight.copy_(latents[torch.randperm(len(latents))[:256]])
    return model


def test_a_latent_cache_records_its_space_and_reports_survival(numbered_root, tmp_path):
    """Ranges only: on toy models the teacher's top-1 does not tell the spaces apart (see test_attack.py)."""
    vqgan, teacher = _tiny_vqgan(), _teacher(NUMBERED_CLASSES)

    def run(space: str):
        cfg = _numbered_cfg(f"attack.space={space}", "cache.shard_size=72", "cache.views=0")
        return cache_teacher(cfg, numbered_root, tmp_path / "latent", teacher, vqgan, progress=False)

    report = run("latent")
    cache = load_teacher_cache(tmp_path / "latent", num_classes=NUMBERED_CLASSES)
    assert report["complete"] and cache.manifest["attack"]["space"] == "latent"
    _check_survival(report["cache_diagnostics"], 2 * 16, codes=True)  # the first batch of each of the 2 shards
    assert report["cache_diagnostics"]["codes_changed"] > 0
    with pytest.raises(CacheMismatchError, match="differs in: attack"):  # never mixed with a pixel cache
        run("pixel")
