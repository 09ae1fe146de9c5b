"""The fast path's pixels are torchvision's (issue #11).

References are torchvision's own transforms on PIL images (what ImageFolder + transforms
gives); without torchvision the same computation is written out with PIL (torchvision's
``Resize`` / ``resized_crop`` on a PIL image is ``Image.resize(..., BILINEAR)``), so the parity
is checked on every machine and against the real torchvision where it installs (CI).
Tolerance (the issue's target): mean absolute difference <= 0.5 grey level, p99 <= 3; where no
DCT-scaled decode is involved the filters are the same and the bound is 1 grey level.
"""
import io
import os

import numpy as np
import pytest
from PIL import Image

from imagenet_seq.decode.transforms import TrainTransform, ValTransform, sample_crop
from imagenet_seq.convert.images import normalise
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg

try:
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
except Exception:  # noqa: BLE001 - absent, or a build that does not import beside this torch
    T = TF = None

REFERENCES = ["pil"] + (["torchvision"] if T is not None else [])


def pil(data):
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def val_reference(data, size=224, resize=256, ref="pil"):
    img = pil(data)
    if ref == "torchvision":
        return np.asarray(T.Compose([T.Resize(resize), T.CenterCrop(size)])(img))
    w, h = img.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    r = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.asarray(r.crop((left, top, left + size, top + size)))


def crop_reference(data, box, size, ref="pil"):
    x, y, w, h = box
    img = pil(data)
    if ref == "torchvision":
        return np.asarray(TF.resized_crop(img, y, x, h, w, [size, size],
                                          T.InterpolationMode.BILINEAR, antialias=True))
    return np.asarray(img.crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR))


def stats(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.quantile(d, 0.99)), int(d.max())


@pytest.fixture(scope="module")
def photos():
    return [p for _, p in _photos()]


@pytest.fixture(scope="module")
def imagenet_like(photos):
    """ImageNet-shaped JPEGs (500x375 / 375x500, ~100 KB), odd sizes and a large photo."""
    rng = np.random.default_rng(11)
    out = [imagenet_like_jpeg(photos[i % len(photos)], rng) for i in range(12)]
    for size in ((333, 257), (257, 333), (499, 101), (640, 481), (120, 90), (2000, 1500)):
        out.append(imagenet_like_jpeg(photos[len(out) % len(photos)], rng, size))
    return out


@pytest.mark.parametrize("ref", REFERENCES)
def test_val_matches_resize_centercrop(imagenet_like, ref):
    worst = []
    for data in imagenet_like:
        mean, p99, mx = stats(ValTransform()(data), val_reference(data, ref=ref))
        worst.append((mean, p99, mx))
        assert mean <= 0.5 and p99 <= 3, (ref, mean, p99, mx)
    # no DCT scaling below a 2x shrink: the very same filter, rounding apart
    assert max(m for _, _, m in worst[:12]) <= 2


@pytest.mark.parametrize("ref", REFERENCES)
@pytest.mark.parametrize("size", [224, 97, 256])
def test_val_other_sizes(imagenet_like, ref, size):
    for data in imagenet_like[::3]:
        out = ValTransform(size, resize=size + 32)(data)
        mean, p99, _ = stats(out, val_reference(data, size, size + 32, ref))
        assert mean <= 0.5 and p99 <= 3


# shrink = crop side / output side, from an 8x upscale-free 0.5x (crop smaller than the output)
SHRINKS = [0.5, 0.8, 1.0, 1.25, 1.5, 1.9, 2.0, 3.0, 4.0, 6.0, 8.0]


@pytest.mark.parametrize("ref", REFERENCES)
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("crop_decode", [True, False])
def test_train_box_matches_resized_crop(photos, ref, shrink, crop_decode):
    """RandomResizedCrop with a fixed box size: our pipeline vs torchvision on the same box."""
    data = imagenet_like_jpeg(photos[1], np.random.default_rng(5), (2000, 1500))
    w, h = pil(data).size
    for size in (128, 97):
        side = max(1, round(size * shrink))
        scale = (side * side) / (w * h)
        t = TrainTransform(size, (scale, scale), (1.0, 1.0), flip=False, crop_decode=crop_decode)
        for seed in range(3):
            box = sample_crop(w, h, t.scale, t.ratio, np.random.default_rng(seed))
            assert abs(box[2] - side) <= 1, box
            out = t(data, np.random.default_rng(seed))
            mean, p99, mx = stats(out, crop_reference(data, box, size, ref))
            assert mean <= 0.5 and p99 <= 3, (shrink, size, box, mean, p99, mx)
            if shrink < 2 * 2:  # below REDUCING_GAP x 2 no DCT scaling: the same filter
                assert mx <= 2, (shrink, size, box, mx)


@pytest.mark.parametrize("ref", REFERENCES)
def test_train_random_boxes_and_flip_on_imagenet_shapes(imagenet_like, ref):
    """Default RandomResizedCrop(224) + flip: the sampled box, resized, flipped like torchvision."""
    t = TrainTransform()
    for i, data in enumerate(imagenet_like):
        w, h = pil(data).size
        for seed in range(4):
            rng = np.random.default_rng(100 * i + seed)
            box = sample_crop(w, h, t.scale, t.ratio, rng)
            flip = rng.random() < 0.5
            ref_img = crop_reference(data, box, 224, ref)
            if flip:
                ref_img = ref_img[:, ::-1]
            mean, p99, mx = stats(t(data, np.random.default_rng(100 * i + seed)), ref_img)
            assert mean <= 0.5 and p99 <= 3, (i, box, flip, mean, p99, mx)


@pytest.mark.parametrize("ref", REFERENCES)
def test_grayscale_and_cmyk_normalised_records(photos, ref):
    """Records as preprocess stores them: a grayscale JPEG as is, a CMYK JPEG re-encoded RGB."""
    base = pil(imagenet_like_jpeg(photos[0], np.random.default_rng(3)))
    records = []
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        base.convert(mode).save(buf, "JPEG", quality=92)
        stored, _ = normalise(buf.getvalue())
        records.append(stored)
    for data in records:
        mean, p99, _ = stats(ValTransform()(data), val_reference(data, ref=ref))
        assert mean <= 0.5 and p99 <= 3
        box = sample_crop(*pil(data).size, (0.3, 0.3), (1.0, 1.0), np.random.default_rng(0))
        t = TrainTransform(224, (0.3, 0.3), (1.0, 1.0), flip=False)
        mean, p99, _ = stats(t(data, np.random.default_rng(0)), crop_reference(data, box, 224, ref))
        assert mean <= 0.5 and p99 <= 3


def test_fast_filter_is_explicit_and_differs(imagenet_like):
    """antialias=False keeps OpenCV's filter: measurably other pixels, never the default."""
    assert TrainTransform().antialias and ValTransform().antialias
    means = [stats(ValTransform(antialias=False)(d), val_reference(d))[0] for d in imagenet_like[:6]]
    assert np.mean(means) > 0.5, means


@pytest.mark.skipif(T is None, reason="needs torchvision (pip install torch==2.14.1 "
                                      "torchvision==0.29.1 here; CI installs them)")
def test_loader_val_batches_match_torchvision_imagefolder(sample_tree, sample_lmdb):
    """The user's path: Loader(root, 'val') batches vs ImageFolder + Resize + CenterCrop."""
    import torch
    from torchvision.datasets import ImageFolder

    from imagenet_seq.data import Loader

    folder = ImageFolder(os.path.join(sample_tree[0], "val"),
                         T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()]))
    ref = torch.stack([folder[i][0] for i in range(len(folder))])
    ref_targets = torch.tensor(folder.targets)
    loader = Loader(sample_lmdb, "val", batch_size=5, num_workers=2)
    images, targets = zip(*loader)
    images, targets = torch.cat(images), torch.cat(targets)
    assert torch.equal(targets, ref_targets)  # val is in sorted file order, like ImageFolder
    mean, p99, mx = stats(images.numpy(), ref.numpy())
    assert mean <= 0.5 and p99 <= 3 and mx <= 2, (mean, p99, mx)


def test_private_op_and_public_interpolate_agree():
    """resize.py calls torch's private AA op (no extra copy); the public fallback gives the same."""
    import torch

    from imagenet_seq.decode import resize

    img = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    src = torch.from_numpy(img).permute(2, 0, 1)[None]
    outs = []
    for fn in (resize._aa_op, resize._aa_public):
        out = np.empty((173, 224, 3), np.uint8)
        fn(src, (173, 224), torch.from_numpy(out).permute(2, 0, 1)[None])
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
