"""Every loader of the product against a live pickle payload: the payload runs under plain ``pickle`` (asserted by
the ``pickle_bomb`` fixture before it is written), and the product refuses the file in one line without running it.

Loaders: teacher (path, ``file://``, ``s3://`` through SeaweedFS), student via ``dad evaluate``, ``dad register``,
VQGAN, a cache shard, ``dad cache-teacher``; the resume and MLflow-model loaders are attacked in ``test_train.py``
and ``test_registry_security.py``. Also: ``dad convert-checkpoint`` turns a pickle into a file the product reads,
running nothing from it, and neither it nor the Lightning placeholders run a payload through a callable torch does not
refuse by name (exec, eval, subprocess, runpy, an import).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dad_core.checkpoint import CheckpointError
from dad_core.serialization import UnsafeFileError, load_torch_file
from dad_core.teacher import TeacherCheckpointError, create_clip_teacher
from dad_core.teacher_cache import CacheMismatchError, TeacherCache
from dad_core.vqgan import VQGAN
from dad_core.vqgan import CheckpointError as VQGANCheckpointError

REFUSED = r"refused, it holds Python objects that could run code.*dad convert-checkpoint"


def _one_line(err: BaseException) -> None:
    assert "\n" not in str(err), str(err)


def test_the_safe_loader_refuses_a_payload_and_names_the_file(tmp_path, pickle_bomb):
    path = pickle_bomb.write(tmp_path / "weights.pt", {"w": torch.ones(2)})
    with pytest.raises(UnsafeFileError, match=rf"weights\.pt: {REFUSED}") as info:
        load_torch_file(path)
    _one_line(info.value)
    assert not pickle_bomb.ran


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_teacher_checkpoint_payload_never_runs(tmp_path, pickle_bomb, as_uri):
    path = pickle_bomb.write(tmp_path / "teacher.pt")
    with pytest.raises(TeacherCheckpointError, match=REFUSED) as info:
        create_clip_teacher("dad-tiny-clip", checkpoint=f"file://{path}" if as_uri else path, classnames=["a", "b"])
    _one_line(info.value)
    assert not pickle_bomb.ran


@pytest.mark.integration
def test_teacher_checkpoint_payload_from_s3_never_runs(tmp_path, pickle_bomb, seaweedfs, monkeypatch):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    bucket = seaweedfs.create_bucket("hostile")
    path = pickle_bomb.write(tmp_path / "teacher.pt")
    seaweedfs.client().upload_file(str(path), bucket, "models/teacher.pt")
    path.unlink()
    with pytest.raises(TeacherCheckpointError, match=r"s3://hostile/models/teacher\.pt: " + REFUSED):
        create_clip_teacher("dad-tiny-clip", checkpoint=f"s3://{bucket}/models/teacher.pt", classnames=["a", "b"])
    assert not pickle_bomb.ran


def _student_dir(tmp_path, pickle_bomb):
    folder = tmp_path / "student"
    folder.mkdir()
    pickle_bomb.write(folder / "state.pt", {"model": {"w": torch.ones(1)}})
    (folder / "meta.json").write_text(json.dumps({"model": "test_resnet", "num_classes": 3, "image_size": 16}))
    return folder


def test_evaluate_cli_refuses_a_payload_in_one_line(tmp_path, pickle_bomb, capsys):
    from dad_core.cli import evaluate

    folder = _student_dir(tmp_path, pickle_bomb)
    (tmp_path / "c.yaml").write_text("{}\n")
    code = evaluate.main(
        ["--checkpoint", str(folder), "--output", str(tmp_path / "eval"), "--config", str(tmp_path / "c.yaml")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "state.pt: refused" in err, err
    assert "\n" not in err
    assert not pickle_bomb.ran


def test_register_refuses_a_payload(tmp_path, pickle_bomb, mlflow_sqlite_uri):
    from dad_core.registry import register_model

    folder = _student_dir(tmp_path, pickle_bomb)
    with pytest.raises(CheckpointError, match=REFUSED):
        register_model(folder, {"ood_mean_top1": 1.0, "clean_top1": 1.0}, name="m", tracking_uri=mlflow_sqlite_uri)
    assert not pickle_bomb.ran


def test_student_missing_keys_is_one_line(tmp_path, capsys):
    from dad_core.checkpoint import save_checkpoint
    from dad_core.student import load_student

    folder = save_checkpoint(
        tmp_path / "s", {"model": {"w": torch.ones(1)}}, {"model": "test_resnet", "num_classes": 3, "image_size": 16}
    )
    with pytest.raises(CheckpointError, match=r"do not fit test_resnet \(Missing key") as info:
        load_student(folder)
    _one_line(info.value)


def test_vqgan_checkpoint_payload_never_runs(tmp_path, pickle_bomb):
    """Lightning files load with inert placeholders for their classes, but never a blocked callable like os.system."""
    path = pickle_bomb.write(tmp_path / "model.ckpt")
    with pytest.raises(VQGANCheckpointError, match=REFUSED):
        VQGAN.from_checkpoint(path)
    assert not pickle_bomb.ran


def test_vqgan_lightning_checkpoint_with_hyper_parameters_still_loads(tmp_path):
    """Published Lightning checkpoints name classes besides their weights: those load as inert placeholders."""
    import argparse

    model = VQGAN.from_config("tiny-f4")
    model.save_checkpoint(tmp_path / "ours.ckpt")
    blob = torch.load(tmp_path / "ours.ckpt", weights_only=True)
    torch.save({**blob, "hyper_parameters": argparse.Namespace(lr=1e-4), "epoch": 3}, tmp_path / "last.ckpt")
    with pytest.raises(UnsafeFileError):
        load_torch_file(tmp_path / "last.ckpt")  # beyond weights_only ...
    loaded = VQGAN.from_checkpoint(tmp_path / "last.ckpt")  # ... but the VQGAN loader takes it with placeholders
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_a_pickled_cache_shard_is_refused(tmp_path, pickle_bomb):
    pickle_bomb.write(tmp_path / "shard-00000.pt", {"labels": torch.zeros(2)})
    cache = TeacherCache(tmp_path, {"shard_size": 2, "num_samples": 2}, num_classes=10)
    with pytest.raises(CacheMismatchError, match=r"shard-00000\.pt: " + REFUSED) as info:
        cache.shard(0)
    _one_line(info.value)
    assert not pickle_bomb.ran


def test_cache_teacher_cli_refuses_a_teacher_payload(tmp_path, pickle_bomb, digits_root, capsys):
    from dad_core.cli import cache_teacher

    teacher = pickle_bomb.write(tmp_path / "teacher.pt")
    vqgan = VQGAN.from_config("tiny-f4").save_checkpoint(tmp_path / "vqgan.ckpt")
    (tmp_path / "c.yaml").write_text("{}\n")
    argv = ["--data-root", str(digits_root), "--output", str(tmp_path / "cache"), "--teacher-checkpoint", str(teacher)]
    argv += ["--vqgan-checkpoint", str(vqgan)]
    code = cache_teacher.main([*argv, "--config", str(tmp_path / "c.yaml"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "teacher.pt: refused" in err and "\n" not in err, err
    assert not pickle_bomb.ran


def test_convert_checkpoint_makes_a_legacy_teacher_loadable(tmp_path, digits_teacher, capsys):
    from dad_core.cli import main as dad

    blob = load_torch_file(digits_teacher)
    legacy = tmp_path / "legacy.pt"
    torch.save({**blob, "best_acc": np.float64(0.9)}, legacy)  # numpy scalars are beyond weights_only
    with pytest.raises(TeacherCheckpointError, match=REFUSED):
        create_clip_teacher("dad-tiny-clip", checkpoint=legacy, classnames=blob["classnames"])
    assert dad.main(["convert-checkpoint", str(legacy), "--output", str(tmp_path / "teacher.safetensors")]) == 0
    assert "converted" in capsys.readouterr().out
    teacher = create_clip_teacher(
        "dad-tiny-clip", checkpoint=tmp_path / "teacher.safetensors", classnames=blob["classnames"]
    )
    reference = create_clip_teacher("dad-tiny-clip", checkpoint=digits_teacher, classnames=blob["classnames"])
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(teacher(images), reference(images))


def test_convert_checkpoint_runs_nothing_and_keeps_a_whole_modules_weights(tmp_path, pickle_bomb, caplog):
    """A pickled ``nn.Module`` (not a state dict), numpy values and an object of a class of its own: the module
    becomes its state dict (without its non-persistent buffer), numpy values survive as numpy rebuilds them, the
    object is dropped with a warning and none of its code runs. A live payload is refused and never runs."""
    from dad_core.serialization import convert_pickled_file, load_tree

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].register_buffer("scratch", torch.ones(1), persistent=False)
    state = {"model": model, "acc": np.float64(0.9), "curve": np.arange(3.0), "meta": {"step": 7}}
    torch.save({**state, "sampler": _Stateful(pickle_bomb.marker)}, tmp_path / "old.pt")
    torch.load(tmp_path / "old.pt", weights_only=False)  # a full unpickler runs its code
    assert pickle_bomb.ran
    pickle_bomb.marker.unlink()

    with caplog.at_level("WARNING"):
        convert_pickled_file(tmp_path / "old.pt", tmp_path / "new.safetensors")

    assert not pickle_bomb.ran
    assert "dropping _Stateful at root.sampler" in caplog.text
    out = load_tree(tmp_path / "new.safetensors")
    want = model.state_dict()
    assert set(out["model"]) == set(want) and "1.scratch" not in out["model"]
    assert all(torch.equal(out["model"][k], v) for k, v in want.items())
    assert float(out["acc"]) == 0.9 and np.array_equal(np.asarray(out["curve"]), np.arange(3.0))
    assert out["meta"] == {"step": 7} and out["sampler"] is None
    with pytest.raises(UnsafeFileError, match=r"bomb\.pt: refused, it names code no checkpoint needs"):
        convert_pickled_file(pickle_bomb.write(tmp_path / "bomb.pt", state), tmp_path / "bomb.safetensors")
    assert not pickle_bomb.ran and not (tmp_path / "bomb.safetensors").exists()


class _Stateful:
    """A class of the writer's own whose restoring code would leave a marker file if it ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __setstate__(self, state) -> None:
        open(state["marker"], "w").close()


def test_a_teacher_checkpoint_of_another_architecture_is_one_line(tmp_path, digits_teacher):
    from dad_core.serialization import save_tree

    blob = load_torch_file(digits_teacher)
    key = next(k for k, v in blob["state_dict"].items() if v.ndim == 2)
    blob["state_dict"][key] = torch.zeros(3, 3)  # a tower of another width
    save_tree(blob, tmp_path / "other.safetensors")
    with pytest.raises(TeacherCheckpointError, match=rf"does not fit dad-tiny-clip: .*{key}") as info:
        create_clip_teacher("dad-tiny-clip", checkpoint=tmp_path / "other.safetensors", classnames=blob["classnames"])
    _one_line(info.value)


class _Reduces:
    """Pickles as ``call(*args)``: a payload through a callable torch's restricted unpickler does not refuse by name
    (only os, posix, nt and sys are refused outright), so only the placeholders stand between it and running."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _live_payloads(marker):
    import importlib
    import runpy
    import subprocess

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "exec": _Reduces(exec, touch),
        "eval": _Reduces(eval, touch),
        "subprocess": _Reduces(subprocess.Popen, ["touch", str(marker)]),
        "runpy": _Reduces(runpy._run_code, touch, {}),
        "import": _Reduces(importlib.import_module, "this"),
    }


@pytest.mark.parametrize("kind", ["exec", "eval", "subprocess", "runpy", "import"])
def test_callables_torch_allows_by_name_never_run_through_placeholders_or_convert(tmp_path, kind):
    """The two places that load a file's classes as placeholders (Lightning checkpoints, ``dad convert-checkpoint``)
    against payloads calling exec, eval, subprocess, runpy or an import: each call becomes an inert placeholder."""
    import pickle
    import subprocess

    from dad_core.serialization import _Placeholder, convert_pickled_file, load_tree

    marker = tmp_path / "PAYLOAD_RAN"
    payload = _live_payloads(marker)[kind]
    if kind != "import":  # live under plain pickle (an import leaves no file: its harm is the module's own code)
        ran = pickle.loads(pickle.dumps(payload))
        if isinstance(ran, subprocess.Popen):
            ran.wait()
        assert marker.exists()
        marker.unlink()
    torch.save({"weight": torch.ones(2), "payload": payload}, tmp_path / "file.ckpt")

    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_torch_file(tmp_path / "file.ckpt")
    loaded = load_torch_file(tmp_path / "file.ckpt", placeholders=True)
    convert_pickled_file(tmp_path / "file.ckpt", tmp_path / "file.safetensors")

    assert isinstance(loaded["payload"], _Placeholder) and not marker.exists()  # the call was never made
    assert torch.equal(loaded["weight"], torch.ones(2))
    out = load_tree(tmp_path / "file.safetensors")
    assert torch.equal(out["weight"], torch.ones(2)) and out["payload"] is None
