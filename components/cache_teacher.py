"""``cache_teacher``: the teacher cache, written by a ``dsl.ParallelFor`` of workers into one shared folder.

``shard_indices`` makes the loop's items, each ``cache_teacher`` task writes its shards (DAD samples, labels, the
teacher's soft labels) into ``cache_dir``, and ``collect_teacher_cache`` turns the finished cache into a ``Dataset``
artifact. The shards stay in ``cache_dir``, a folder every worker and every training node can reach (a local
folder in a local run, a ReadWriteMany volume in the cluster); the artifact holds a copy of the manifest and
points at the folder through its metadata.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components._image import DAD_IMAGE


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def shard_indices(num_shards: int) -> list:
    """``[0, 1, ..., num_shards - 1]``: the items of the cache workers' loop.

    Args:
        num_shards: how many workers split the cache.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return list(range(num_shards))


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def cache_teacher(
    dataset: Input[Dataset],
    teacher: Input[Model],
    vqgan: Input[Model],
    cache_dir: str,
    shard_index: int,
    num_shards: int,
    params: list,
) -> str:
    """Run ``dad cache-teacher`` as worker ``shard_index`` of ``num_shards``; returns its report (JSON).

    Finished shards are skipped, so a retried task resumes; the last worker to finish writes ``manifest.json``.

    Args:
        dataset: the prepared dataset.
        teacher: the teacher checkpoint.
        vqgan: the VQGAN checkpoint.
        cache_dir: the cache folder shared by all workers.
        shard_index: this worker's index.
        num_shards: the number of workers.
        params: dotted config overrides (``cache.*``, ``attack.*``, ``teacher.*``).
    """
    from pathlib import Path

    from dad_core.cli import cache_teacher as cli

    shard_index = int(shard_index)  # loop items may arrive as floats
    report = Path(cache_dir) / f"report-{shard_index}.json"
    argv = ["--data-root", dataset.path, "--output", cache_dir, "--report", str(report), "--no-progress"]
    argv += ["--teacher-checkpoint", teacher.path, "--vqgan-checkpoint", vqgan.path]
    argv += ["--shard-index", str(shard_index), "--num-shards", str(num_shards)]
    code = cli.main(argv + [arg for item in params for arg in ("-p", item)])
    if code != 0:
        raise RuntimeError(f"dad cache-teacher (worker {shard_index}) failed with exit code {code}; see the log above")
    return report.read_text()


@dsl.component(base_image=DAD_IMAGE, install_kfp_package=False)
def collect_teacher_cache(cache_dir: str, worker_reports: list, teacher_cache: Output[Dataset]):
    """Check that the workers finished the cache and publish it as a ``Dataset`` artifact.

    Args:
        cache_dir: the shared cache folder.
        worker_reports: the workers' reports (``dsl.Collected``), for their throughput.
        teacher_cache: a copy of ``manifest.json``; metadata ``path`` is the cache folder, ``manifest_sha256`` its
            fingerprint.
    """
    import hashlib
    import json
    from pathlib import Path

    manifest = Path(cache_dir) / "manifest.json"
    if not manifest.is_file():
        raise RuntimeError(f"{manifest} is missing: the cache is incomplete (a cache_teacher worker did not finish)")
    data = manifest.read_bytes()
    Path(teacher_cache.path).write_bytes(data)
    info, sha256 = json.loads(data), hashlib.sha256(data).hexdigest()
    teacher_cache.metadata.update({k: info[k] for k in ("dataset_hash", "num_samples", "num_shards")})
    teacher_cache.metadata.update(path=cache_dir, manifest_sha256=sha256)
    teacher_cache.metadata["images_per_s"] = round(sum(json.loads(r)["images_per_s"] for r in worker_reports), 2)
