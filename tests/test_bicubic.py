"""Antialiased bicubic on the fast path: torchvision's ``Resize(..., BICUBIC)`` pixels (issue 23).

timm's models default to bicubic (``resnet10t``'s pretrained cfg says ``'bicubic'``), so timm's
val used to leave the fast path for timm's per-image PIL transform, silently. References and
tolerances are those of ``tests/test_fidelity_pixels.py`` for bilinear: torchvision on PIL
images (what ImageFolder and timm's transforms give) and on uint8 tensors; mean absolute
difference <= 0.5 grey level and p99 <= 3, and at most 2 grey levels apart where no DCT-scaled
decode is involved (the same filter, rounding apart). The timm test lets timm drive: a real
``resnet10t``, ``resolve_data_config`` for its settings, our ``create_loader`` against timm's own
loader over the same images.
"""
import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imagenet_seq.decode import resize
from imagenet_seq.decode.transforms import TrainTransform, ValTransform, sample_crop
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg

T = pytest.importorskip("torchvision.transforms")
import torchvision.transforms.functional as TF  # noqa: E402
import torchvision.transforms.v2.functional as F2  # noqa: E402

BICUBIC = T.InterpolationMode.BICUBIC
CPU = torch.device("cpu")


def pil(data):
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def stats(a, b):
    """(mean, p99, max) absolute difference in grey levels, and the fraction of values that
    differ at all."""
    d = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
    return float(d.mean()), float(np.quantile(d, 0.99)), int(d.max()), float((d > 0).mean())


def val_reference(data, size, resize_size, ref):
    img = pil(data)
    if ref == "pil":  # torchvision's transforms on the PIL image (ImageFolder, timm)
        return np.asarray(T.Compose([T.Resize(resize_size, BICUBIC), T.CenterCrop(size)])(img))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # v2 on a uint8 tensor
    out = F2.center_crop(F2.resize(t, resize_size, interpolation=BICUBIC, antialias=True), size)
    return out.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photos():
    return [p for _, p in _photos()]


@pytest.fixture(scope="module")
def images(photos):
    """ImageNet-shaped JPEGs (no DCT scaling for val at 256) then odd sizes and a 2000x1500
    photo (decoded at 1/2 and 1/4 scale)."""
    rng = np.random.default_rng(23)
    out = [imagenet_like_jpeg(photos[i % len(photos)], rng) for i in range(8)]
    for size in ((333, 257), (257, 333), (499, 101), (640, 481), (120, 90), (2000, 1500)):
        out.append(imagenet_like_jpeg(photos[len(out) % len(photos)], rng, size))
    return out


@pytest.mark.parametrize("ref", ["pil", "tensor"])
@pytest.mark.parametrize("size,resize_size", [(224, 256), (176, 201), (97, 129)])
def test_val_bicubic_matches_resize_centercrop(images, ref, size, resize_size):
    t = ValTransform(size, resize_size, interpolation="bicubic")
    for i, data in enumerate(images):
        w, h = pil(data).size
        mean, p99, mx, frac = stats(t(data), val_reference(data, size, resize_size, ref))
        assert mean <= 0.5 and p99 <= 3, (i, ref, mean, p99, mx, frac)
        if min(w, h) < 2 * 2 * resize_size:  # no DCT-scaled decode: the same filter
            assert mx <= 2 and frac <= 0.02, (i, ref, mean, p99, mx, frac)


@pytest.mark.parametrize("shrink", [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0])
def test_train_bicubic_box_matches_resized_crop(photos, shrink):
    """RandomResizedCrop(interpolation=BICUBIC) on the same box, crop decode and DCT scaling on."""
    data = imagenet_like_jpeg(photos[1], np.random.default_rng(5), (2000, 1500))
    w, h = pil(data).size
    for size in (128, 97):
        side = max(1, round(size * shrink))
        scale = (side * side) / (w * h)
        t = TrainTransform(size, (scale, scale), (1.0, 1.0), flip=False,
                           interpolation="bicubic")
        for seed in range(3):
            x, y, bw, bh = sample_crop(w, h, t.scale, t.ratio, np.random.default_rng(seed))
            ref = TF.resized_crop(pil(data), y, x, bh, bw, [size, size], BICUBIC, antialias=True)
            mean, p99, mx, frac = stats(t(data, np.random.default_rng(seed)), ref)
            assert mean <= 0.5 and p99 <= 3, (shrink, size, mean, p99, mx, frac)
            if shrink < 2 * 2:  # below REDUCING_GAP x 2 no DCT scaling
                assert mx <= 2, (shrink, size, mx)


def test_train_bicubic_flip_and_default_boxes(images):
    t = TrainTransform(224, interpolation="bicubic")
    for i, data in enumerate(images[:8]):
        w, h = pil(data).size
        rng = np.random.default_rng(i)
        x, y, bw, bh = sample_crop(w, h, t.scale, t.ratio, rng)
        ref = np.asarray(TF.resized_crop(pil(data), y, x, bh, bw, [224, 224], BICUBIC,
                                         antialias=True))
        if rng.random() < 0.5:
            ref = ref[:, ::-1]
        mean, p99, mx, _ = stats(t(data, np.random.default_rng(i)), ref)
        assert mean <= 0.5 and p99 <= 3, (i, mean, p99, mx)


def test_bicubic_is_not_bilinear(images):
    """The setting reaches the filter: bilinear output is measurably off the bicubic reference."""
    data = images[0]
    ref = val_reference(data, 224, 256, "pil")
    bic = stats(ValTransform(interpolation="bicubic")(data), ref)
    bil = stats(ValTransform()(data), ref)
    assert bil[3] > 10 * max(bic[3], 1e-3) and bil[0] > bic[0], (bil, bic)


def test_interpolation_checked():
    with pytest.raises(ValueError, match=r"interpolation='nearest'.*'bilinear', 'bicubic'"):
        ValTransform(interpolation="nearest")
    with pytest.raises(ValueError, match="antialias=True"):
        TrainTransform(interpolation="bicubic", antialias=False)
    assert "interpolation='bicubic'" in repr(TrainTransform(interpolation="bicubic"))


def test_bicubic_private_op_and_public_interpolate_agree():
    img = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    src = torch.from_numpy(img).permute(2, 0, 1)[None]
    outs = []
    for fn in (resize._aa_op, resize._aa_public):
        out = np.empty((173, 224, 3), np.uint8)
        fn(src, (173, 224), torch.from_numpy(out).permute(2, 0, 1)[None], "bicubic")
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


def test_set_image_size_keeps_bicubic(sample_lmdb):
    from imagenet_seq.data import Loader

    with Loader(sample_lmdb, "val", ValTransform(64, 80, interpolation="bicubic"),
                batch_size=4, num_workers=0) as ld:
        ld.set_image_size(48)
        images, _ = next(iter(ld))
    assert images.shape == (4, 3, 48, 48)
    with Loader(sample_lmdb, "val", ValTransform(48, 60, interpolation="bicubic"),
                batch_size=4, num_workers=0) as ref:
        want, _ = next(iter(ref))
    assert torch.equal(images, want)


def test_loader_val_batches_match_torchvision_imagefolder(sample_tree, sample_lmdb):
    """The Loader with a bicubic ValTransform vs ImageFolder + Resize(BICUBIC) + CenterCrop."""
    from torchvision.datasets import ImageFolder

    from imagenet_seq.data import Loader

    folder = ImageFolder(os.path.join(sample_tree[0], "val"),
                         T.Compose([T.Resize(256, BICUBIC), T.CenterCrop(224), T.PILToTensor()]))
    ref = torch.stack([folder[i][0] for i in range(len(folder))])
    with Loader(sample_lmdb, "val", ValTransform(224, 256, interpolation="bicubic"),
                batch_size=5, num_workers=2) as loader:
        assert loader.worker_type == "thread"  # the fast path's workers
        images, targets = (torch.cat(x) for x in zip(*loader))
    assert torch.equal(targets, torch.tensor(folder.targets))
    mean, p99, mx, frac = stats(images.numpy(), ref.numpy())
    assert mean <= 0.5 and p99 <= 3 and mx <= 2, (mean, p99, mx, frac)


# ---- timm drives: its model's data config, our create_loader, timm's own loader as reference

def _timm_records(caplog):
    return [r for r in caplog.records if r.name == "imagenet_seq.integrations.timm"]


def _grey(images, cfg):
    """Normalised float batches back to grey levels."""
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    return (images * std + mean).round().clamp(0, 255).to(torch.uint8)


def test_timm_val_bicubic_takes_the_fast_path_with_torchvisions_pixels(
        sample_tree, sample_lmdb, caplog):
    timm = pytest.importorskip("timm")
    from timm.data import create_dataset, resolve_data_config
    from timm.data import create_loader as timm_create_loader

    from imagenet_seq.integrations.timm import create_loader

    torch.set_num_threads(1)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["interpolation"] == "bicubic"  # what made val leave the fast path before
    args = dict(input_size=cfg["input_size"], batch_size=6, is_training=False,
                interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], num_workers=1,
                device=CPU)  # train.py's eval create_loader arguments
    with caplog.at_level(logging.INFO, logger="imagenet_seq.integrations.timm"):
        ours = create_loader(sample_lmdb, **args)
        got = [list(ours) for _ in range(2)]  # two passes: still one log line
    records = _timm_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert "val loader" in msg and "fast path" in msg and "bicubic" in msg, msg
    assert ours.loader.path == "fast" and ours.loader.loader.worker_type == "thread"

    theirs = timm_create_loader(create_dataset("", root=os.path.join(sample_tree[0], "val")),
                                **args)
    want = list(theirs)
    images, targets = (torch.cat(x) for x in zip(*got[0]))
    ref, ref_targets = (torch.cat(x) for x in zip(*want))
    assert torch.equal(targets, ref_targets) and images.shape == ref.shape
    assert images.shape[-1] == cfg["input_size"][-1]
    mean, p99, mx, frac = stats(_grey(images, cfg).numpy(), _grey(ref, cfg).numpy())
    assert mean <= 0.5 and p99 <= 3 and mx <= 2, (mean, p99, mx, frac)
    assert torch.equal(torch.cat([x for x, _ in got[1]]), images)
    with torch.no_grad():
        assert model(images).shape == (len(images), 4)
    ours.loader.loader.close()


def test_timm_train_paths_are_logged_once_each(sample_lmdb, caplog):
    pytest.importorskip("timm")
    from imagenet_seq.integrations.timm import create_loader

    kw = dict(input_size=32, batch_size=8, is_training=True, num_workers=0, device=CPU)
    with caplog.at_level(logging.INFO, logger="imagenet_seq.integrations.timm"):
        fast = create_loader(sample_lmdb, interpolation="bicubic", color_jitter=0, **kw)
        plain = create_loader(sample_lmdb, interpolation="bilinear", color_jitter=0, **kw)
        slow = create_loader(sample_lmdb, interpolation="random", **kw)  # train.py's defaults
        first = [next(iter(ld))[0] for ld in (fast, plain)]
    msgs = [r.getMessage() for r in _timm_records(caplog)]
    assert len(msgs) == 3, msgs
    assert "fast path" in msgs[0] and "bicubic" in msgs[0] and fast.loader.path == "fast"
    assert "per-image path" in msgs[2] and slow.loader.path == "per-image"
    assert "interpolation='random'" in msgs[2] and "color_jitter=0.4" in msgs[2]
    assert slow.loader.path_reason in msgs[2]
    assert not torch.equal(first[0], first[1])  # the same crops, another filter
    for ld in (fast, plain, slow):
        ld.loader.loader.close()


def test_a_given_transform_keeps_its_size(sample_lmdb):
    """Loader(root, 'val', ValTransform(48, 60, 'bicubic')) makes 48 px images (the default
    image_size=224 used to resize the transform's copies to 224)."""
    from imagenet_seq.data import Loader

    for mode, t in (("val", ValTransform(48, 60, interpolation="bicubic")),
                    ("train", TrainTransform(40, interpolation="bicubic"))):
        with Loader(sample_lmdb, mode, t, batch_size=4, num_workers=0) as ld:
            images, _ = next(iter(ld))
        assert ld.image_size == t.size and images.shape == (4, 3, t.size, t.size)
