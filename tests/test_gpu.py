"""GPU tier: the bf16 / channels_last / compile paths on CUDA agree with the CPU fp32 path. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from dad_core.config import load_config

pytestmark = pytest.mark.gpu


def test_dad_generation_in_bf16_stays_close_to_fp32(tiny_teacher):
    from dad_core.attack import generate_dad_samples
    from dad_core.vqgan import VQGAN

    cfg = load_config(None, ["attack.random_start=0"]).attack
    vqgan = VQGAN.from_config("tiny-f4").eval()
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    reference = generate_dad_samples(tiny_teacher, vqgan, images, labels, cfg)
    cuda_teacher, cuda_vqgan = tiny_teacher.cuda(), vqgan.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = generate_dad_samples(
            cuda_teacher, cuda_vqgan, images.cuda().contiguous(memory_format=torch.channels_last), labels.cuda(), cfg
        )
    # Random weights put many codes near ties, so compare images, not codes: most pixels must agree closely.
    close = ((fast.float().cpu() - reference).abs() < 0.05).float().mean().item()
    assert close > 0.9


def test_train_step_bf16_channels_last_and_compile():
    from dad_core.student import create_student
    from dad_core.task import DADTask

    cfg = load_config(None, [])
    student = create_student("resnet10t", 10).cuda().to(memory_format=torch.channels_last)
    task = DADTask(torch.compile(student), cfg.loss, num_classes=10)
    batch = {
        "clean": torch.rand(8, 3, 32, 32),
        "dad": torch.rand(8, 3, 32, 32),
        "label": torch.randint(0, 10, (8,)),
        "t_clean": torch.softmax(torch.randn(8, 10), -1),
        "t_dad": torch.softmax(torch.randn(8, 10), -1),
    }
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]).item()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_nccl_process_group_initializes(tmp_path, monkeypatch):
    from dad_core.distributed import cleanup_distributed, init_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    info, device = init_distributed()
    try:
        assert device.type == "cuda" and torch.distributed.get_backend() == "nccl"
        value = torch.ones(1, device=device)
        torch.distributed.all_reduce(value)
        assert value.item() == 1.0
    finally:
        cleanup_distributed()


def test_the_device_replay_queues_without_a_sync_and_matches_the_cpu():
    """``apply_views`` with RandAugment on CUDA, its view rows and draws on the host as the training loop keeps them:
    no synchronising call (the step is queued while the GPU runs the previous one), and the CPU's pixels."""
    from dad_core.randaugment import encode_ops
    from dad_core.views import apply_views

    policy = "rand-m9-mstd0.5-inc1"
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (32, 3, 40, 40), generator=gen, dtype=torch.uint8)
    dad = torch.randint(0, 256, (32, 3, 40, 40), generator=gen, dtype=torch.uint8)
    views = torch.tensor([[i % 7, i % 5, 30 - i % 9, 28 + i % 11, i % 2, 1000 + i] for i in range(32)])
    drawn = torch.stack([encode_ops(int(seed), policy) for seed in views[:, 5]])
    want = apply_views([clean, dad], views, 24, randaugment=policy, drawn=drawn)
    images = [clean.cuda(), dad.cuda()]
    apply_views(images, views, 24, randaugment=policy, drawn=drawn)  # warm: caches, pinned blocks
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        got = apply_views(images, views, 24, randaugment=policy, drawn=drawn)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    for g, w in zip(got, want):  # the resize kernel's rounding may move a value across a uint8 level, rarely
        assert ((g.cpu() - w).abs() <= 1 / 255 + 1e-6).float().mean() > 0.999
        assert ((g.cpu() - w).abs() < 1e-6).float().mean() > 0.99


def test_the_device_resize_is_the_cpus_but_for_the_last_bit():
    """The batched crop + resize + flip on CUDA takes the CPU's taps (torch's own weights) and sums them in the same
    order, so a value differs from the CPU's at most where the GPU rounds a multiply-add differently."""
    import numpy as np

    from dad_core.views import apply_views, sample_views

    images = torch.randint(0, 256, (64, 3, 256, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    rows = sample_views(64, 1, 256, 256, np.random.default_rng(0), scale=(0.08, 1.0), hflip=0.5)[:, 0]

    (want,) = apply_views([images], rows, 224)
    (got,) = apply_views([images.cuda()], rows, 224)

    assert float((got.cpu() - want).abs().max()) <= 1e-6


def test_the_recipe_step_queues_without_a_sync():
    """The README ImageNet recipe's step (cached teacher, mixup and cutmix, random erasing) on CUDA: no synchronising
    call, so the host queues the next step while the GPU runs this one. Both mixes are drawn over the steps."""
    import numpy as np

    from dad_core.config import LossConfig
    from dad_core.student import create_student
    from dad_core.task import DADTask

    student = create_student("resnet10t", 10).cuda()
    task = DADTask(student, LossConfig(), num_classes=10, mixup=0.8, cutmix=1.0, reprob=0.25).cuda().train()
    probs = torch.softmax(torch.randn(8, 10), -1)
    batch = {"clean": torch.rand(8, 3, 32, 32), "dad": torch.rand(8, 3, 32, 32), "label": torch.randint(0, 10, (8,))}
    batch = {k: v.cuda() for k, v in {**batch, "t_clean": probs, "t_dad": probs}.items()}
    rng = np.random.default_rng(0)
    task(batch, rng)["loss"].backward()  # warm: cuDNN plans, pinned blocks
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            task(batch, rng)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
