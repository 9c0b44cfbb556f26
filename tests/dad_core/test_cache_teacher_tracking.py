"""``dad cache-teacher`` logs the attack-survival diagnostics to the tracker: per shard (step = shard id), the
worker's mean and, once the cache is complete, the whole cache's mean and samples.png."""

from __future__ import annotations

from dad_core.config import load_config


class _Recorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []
        self.params: dict = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append((str(path), artifact_path))


def test_survival_diagnostics_go_to_the_tracker(tmp_path, monkeypatch):
    import dad_core.tracking
    from dad_core.cli import cache_teacher as cli

    recorder, runs = _Recorder(), []

    def create_tracker(cfg, *, primary, run_name=None, **kwargs):
        runs.append(run_name)
        return recorder

    monkeypatch.setattr(dad_core.tracking, "create_tracker", create_tracker)
    (tmp_path / "samples.png").write_bytes(b"png")
    shard = {"images": 32, "top1_dad": 0.5, "codes_changed": None}
    report = {
        "shard_index": 1,
        "num_shards": 2,
        "images_per_s": 12.5,
        "complete": True,
        "shard_diagnostics": [{"shard": 1, **shard}, {"shard": 3, **shard}],
        "diagnostics": {"images": 64, "top1_dad": 0.5, "codes_changed": None},
        "cache_diagnostics": {"images": 128, "top1_dad": 0.25},
    }
    cli._log_to_mlflow(load_config(None, ["attack.space=latent"]), report, tmp_path)
    assert runs == ["cache-teacher worker 1/2"]
    assert recorder.params["attack"]["space"] == "latent"
    assert recorder.metrics == [
        ({"cache/images_per_s": 12.5}, None),
        ({"cache/shard/images": 32, "cache/shard/top1_dad": 0.5, "cache/shard/codes_changed": None}, 1),
        ({"cache/shard/images": 32, "cache/shard/top1_dad": 0.5, "cache/shard/codes_changed": None}, 3),
        ({"cache/images": 64, "cache/top1_dad": 0.5, "cache/codes_changed": None}, None),
        ({"cache/all/images": 128, "cache/all/top1_dad": 0.25}, None),
    ]
    assert recorder.artifacts == [(str(tmp_path / "samples.png"), "cache")]
