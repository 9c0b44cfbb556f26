"""The torchrun environment is the only distributed contract; without it everything is one process on rank 0."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dad_core.distributed import (
    WorldInfo,
    barrier,
    cleanup_distributed,
    copy_arrays_to_device,
    copy_to_device,
    getenv,
    init_distributed,
    is_primary,
    resolve_device,
    set_seed,
    world_info_from_env,
)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_without_env_vars(no_torchrun):
    info = world_info_from_env()
    assert info == WorldInfo(rank=0, local_rank=0, world_size=1)
    assert not info.distributed
    assert is_primary()
    info, device = init_distributed("cpu")
    assert info.world_size == 1
    assert device == torch.device("cpu")
    assert not (dist.is_available() and dist.is_initialized())  # no process group for a single process
    barrier()  # no-ops without a process group
    cleanup_distributed()


def test_torchrun_env_vars_are_reflected(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = world_info_from_env()
    assert info == WorldInfo(rank=3, local_rank=1, world_size=4)
    assert info.distributed
    assert not is_primary()
    monkeypatch.setenv("RANK", "0")
    assert is_primary()


def test_getenv_reads_one_variable(monkeypatch):
    monkeypatch.setenv("DAD_TEST_SETTING", "x")
    monkeypatch.delenv("DAD_TEST_MISSING", raising=False)
    assert getenv("DAD_TEST_SETTING") == "x"
    assert getenv("DAD_TEST_MISSING") is None
    assert getenv("DAD_TEST_MISSING", "d") == "d"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_copy_to_device_goes_through_pinned_memory_without_blocking_on_a_gpu(monkeypatch):
    """A GPU copy from pageable memory waits for the GPU's queue; the helper pins and copies asynchronously."""
    t = torch.arange(4)
    assert torch.equal(copy_to_device(t, torch.device("cpu")), t)
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((device.type, non_blocking))
            return "on the device"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned())
    assert copy_to_device(t, torch.device("cuda")) == "on the device"
    assert calls == [("cuda", True)]


def test_host_arrays_go_to_the_device_in_one_copy_and_come_back_exact(monkeypatch):
    import dad_core.distributed as distributed

    copies = []
    monkeypatch.setattr(distributed, "copy_to_device", lambda t, device: copies.append(t.dtype) or t.to(device))
    index = np.array([[0, 7], [2**40, 3]], dtype=np.int64)
    weight = np.array([0.1, 1 / 3, 2.5e-8], dtype=np.float32)
    empty = np.empty((0, 6))

    got = copy_arrays_to_device([index, weight, empty], torch.device("cpu"))

    assert copies == [torch.float64]  # one copy for all three
    assert [tuple(t.shape) for t in got] == [(2, 2), (3,), (0, 6)]
    assert np.array_equal(got[0].long().numpy(), index)
    assert np.array_equal(got[1].float().numpy(), weight)  # float32 values survive float64 exactly


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_set_seed_is_reproducible_and_offsets_by_rank():
    set_seed(5)
    a = _draws()
    set_seed(5)
    b = _draws()
    assert a[:2] == b[:2]
    assert torch.equal(a[2], b[2])
    set_seed(5, rank=1)
    c = _draws()
    set_seed(6)
    d = _draws()
    assert c[:2] == d[:2]
    assert torch.equal(c[2], d[2])
    assert not torch.equal(a[2], c[2])
