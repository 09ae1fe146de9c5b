"""imagenet_seq.integrations.timm: timm's create_loader over the Loader, and timm's training
step loop (model, optimizer, scheduler, FastCollateMixup / Mixup, PrefetchLoader, random
erasing) run for a few steps on the CPU with it."""
import pytest
import torch

timm = pytest.importorskip("timm")
from timm.data import FastCollateMixup, Mixup  # noqa: E402
from timm.data.loader import PrefetchLoader  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402

from imagenet_seq.integrations.timm import TimmBatches, create_loader  # noqa: E402
from import_errors import import_error  # noqa: E402

CPU = torch.device("cpu")
N_CLASSES = 4


def _train_steps(model, loader, optimizer, scheduler, loss_fn, epochs, mixup_fn=None,
                 mixup_off_epoch=0):
    """The core of timm's train.py (train_one_epoch and the epoch loop), on the CPU."""
    num_updates, losses, shapes = 0, [], []
    for epoch in range(epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if mixup_off_epoch and epoch >= mixup_off_epoch:
            if isinstance(loader, PrefetchLoader) and loader.mixup_enabled:
                loader.mixup_enabled = False
            elif mixup_fn is not None:
                mixup_fn.mixup_enabled = False
        model.train()
        for input, target in loader:
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
            output = model(input)
            loss = loss_fn(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            losses.append(loss.item())
            shapes.append((tuple(input.shape), input.dtype, tuple(target.shape)))
        scheduler.step(epoch + 1)
    return num_updates, losses, shapes


def _model_opt(loader_len, epochs):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=N_CLASSES)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs,
                                       updates_per_epoch=loader_len)
    return model, optimizer, scheduler


def test_prefetcher_fastcollatemixup_train_loop(sample_lmdb):
    torch.set_num_threads(1)
    mixup = FastCollateMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                             num_classes=N_CLASSES)
    loader = create_loader(sample_lmdb, (3, 32, 32), 8, is_training=True, re_prob=0.25,
                           color_jitter=0, collate_fn=mixup, num_workers=1, device=CPU)
    assert isinstance(loader, PrefetchLoader)
    base = loader.loader.loader
    assert base.worker_type == "thread" and base.drop_last  # the fast path; timm drops last
    assert len(loader) == 48 // 8
    model, opt, sched = _model_opt(len(loader), 2)
    steps, losses, shapes = _train_steps(model, loader, opt, sched, SoftTargetCrossEntropy(), 2,
                                         mixup_off_epoch=1)
    assert steps == 2 * len(loader)
    assert all(torch.isfinite(torch.tensor(losses)))
    # float, normalised on the "device" by PrefetchLoader; soft targets from FastCollateMixup
    assert shapes[0] == ((8, 3, 32, 32), torch.float32, (8, N_CLASSES))
    assert loader.mixup_enabled is False and base.epoch == 1  # train.py's calls reached us


def test_pil_path_auto_augment_and_mixup_fn(sample_lmdb):
    torch.set_num_threads(1)
    loader = create_loader(sample_lmdb, 32, 8, is_training=True, auto_augment="rand-m9-mstd0.5",
                           interpolation="bicubic", num_workers=1, device=CPU,
                           use_prefetcher=False)
    assert isinstance(loader, TimmBatches) and loader.loader.worker_type == "process"
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                     num_classes=N_CLASSES)
    model, opt, sched = _model_opt(len(loader), 1)
    steps, losses, shapes = _train_steps(model, loader, opt, sched, SoftTargetCrossEntropy(), 1,
                                         mixup_fn=mixup_fn)
    assert steps == len(loader) == 6
    assert shapes[0] == ((8, 3, 32, 32), torch.float32, (8, N_CLASSES))
    with pytest.raises(ValueError, match="auto_augment"):
        create_loader(sample_lmdb, 32, 8, is_training=True, auto_augment="rand-m9",
                      path="fast", device=CPU)


def test_eval_loader_normalises_the_loaders_pixels(sample_lmdb):
    from imagenet_seq.data import Loader

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = create_loader(sample_lmdb, (3, 32, 32), 12, is_training=False, crop_pct=0.8,
                           mean=mean, std=std, num_workers=0, device=CPU)
    (images, targets), = list(loader)
    ref = Loader(sample_lmdb, "val", batch_size=12, num_workers=0, image_size=32,
                 resize_size=40)
    (raw, want), = list(ref)
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    assert torch.allclose(images, (raw.float() - m) / s)
    assert torch.equal(targets, want)
    host = create_loader(sample_lmdb, 32, 12, crop_pct=0.8, mean=mean, std=std,
                         num_workers=0, use_prefetcher=False)
    (h, _), = list(host)
    assert torch.allclose(h, images)


def test_bad_input(sample_lmdb):
    for bad in (8, 15.5, (3, 8, 8), "224"):
        with pytest.raises(ValueError, match="input_size"):
            create_loader(sample_lmdb, bad, 8, device=CPU)
    with pytest.raises(ValueError, match="square"):
        create_loader(sample_lmdb, (3, 32, 48), 8, device=CPU)
    with pytest.raises(ValueError, match="num_aug_repeats"):
        create_loader(sample_lmdb, 32, 8, num_aug_repeats=3, device=CPU)
    with pytest.raises(ValueError, match="input_size_choices"):
        create_loader(sample_lmdb, 32, 8, input_size_choices=[32, 48], device=CPU)
    # the arguments today's timm train.py passes with their defaults are accepted
    loader = create_loader(sample_lmdb, 32, 8, input_size_choices=None, batch_size_choices=None,
                           batch_choice_weights=None, batch_choice_seed=0, num_batches=None,
                           batch_choice_schedule="constant", batch_schedule_epochs=None,
                           batch_schedule_spread=0.65, batch_schedule_random_mix=0.1,
                           use_multi_epochs_loader=False, worker_seeding="all", num_workers=0,
                           device=CPU)
    assert loader.batch_sampler is None and len(loader.sampler) == 12  # train.py reads both


def test_missing_or_old_timm_names_pip_line():
    out, both = import_error("import sys; sys.modules['timm'] = None",
                             "imagenet_seq.integrations.timm", timeout=60)
    assert 'pip install "imagenet_seq[timm]"' in out, both
    out, both = import_error("import timm; timm.__version__ = '0.9.16'",
                             "imagenet_seq.integrations.timm")
    assert "found 0.9.16" in out and '[timm]" --upgrade' in out, both
