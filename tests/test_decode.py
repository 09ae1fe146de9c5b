import io
import math
import pickle

import cv2
import numpy as np
import pytest
from PIL import Image

from imagenet_seq.decode import transforms as decode
from imagenet_seq.decode.transforms import (DecodeError, PILTransform, TrainTransform, ValTransform,
                                 jpeg_size, sample_crop)
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg

from conftest import pil_rgb


@pytest.fixture(scope="module")
def photo():
    return _photos()[0][1]


@pytest.fixture(scope="module")
def jpegs(photo):
    """ImageNet-like JPEGs: landscape, portrait, large (DCT-scalable), tiny (upscaled)."""
    rng = np.random.default_rng(3)
    return {
        "landscape": imagenet_like_jpeg(photo, np.random.default_rng(1), (500, 375)),
        "portrait": imagenet_like_jpeg(photo, np.random.default_rng(2), (375, 500)),
        "large": imagenet_like_jpeg(photo, rng, (1600, 1200)),
        "tiny": imagenet_like_jpeg(photo, rng, (90, 70)),
    }


def encode_pil(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_image(out, size):
    assert isinstance(out, np.ndarray)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


# --- header parsing -------------------------------------------------------------------------

def test_jpeg_size_reads_frame_header(jpegs):
    for data in jpegs.values():
        h, w = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert jpeg_size(data) == (w, h)


def test_jpeg_size_progressive_and_non_jpeg(photo):
    img = Image.fromarray(photo[:300, :400, ::-1])
    assert jpeg_size(encode_pil(img, progressive=True, quality=90)) == (400, 300)
    assert jpeg_size(encode_pil(img, "PNG")) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0") is None  # cut inside the header
    assert jpeg_size(b"") is None


# --- output contract ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["landscape", "portrait", "large", "tiny"])
def test_train_and_val_shapes(jpegs, name):
    rng = np.random.default_rng(0)
    for size in (224, 96):
        assert_image(TrainTransform(size)(jpegs[name], rng), size)
        assert_image(ValTransform(size, resize=int(size * 256 / 224))(jpegs[name]), size)


def test_grayscale_png_and_progressive_give_rgb(photo):
    base = Image.fromarray(photo[:, :, ::-1]).resize((400, 300))
    gray = encode_pil(base.convert("L"), quality=90)
    rng = np.random.default_rng(0)
    out = TrainTransform(64)(gray, rng)
    assert_image(out, 64)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    assert_image(ValTransform()(gray), 224)
    for data in (encode_pil(base, "PNG"), encode_pil(base, progressive=True, quality=90)):
        assert_image(TrainTransform(64)(data, rng), 64)
        assert_image(ValTransform()(data), 224)


def test_transforms_pickle(jpegs):
    t = pickle.loads(pickle.dumps(TrainTransform(128, scale=(0.2, 1.0), flip=False)))
    assert (t.size, t.scale, t.flip) == (128, (0.2, 1.0), False)
    v = pickle.loads(pickle.dumps(ValTransform(100, 120)))
    assert (v.size, v.resize) == (100, 120)
    a = t(jpegs["landscape"], np.random.default_rng(5))
    b = TrainTransform(128, scale=(0.2, 1.0), flip=False)(jpegs["landscape"],
                                                           np.random.default_rng(5))
    assert np.array_equal(a, b)


# --- randomness -----------------------------------------------------------------------------

def test_train_deterministic_under_fixed_rng(jpegs):
    t = TrainTransform()
    for data in jpegs.values():
        a = [t(data, np.random.default_rng(42)) for _ in range(2)]
        assert np.array_equal(a[0], a[1])
    data = jpegs["landscape"]
    rng = np.random.default_rng(42)
    outs = [t(data, rng) for _ in range(6)]
    assert len({o.tobytes() for o in outs}) == 6  # successive draws give different crops


def _spec_boxes(width, height, scale, ratio, n, seed):
    """Independent vectorised statement of torchvision's RandomResizedCrop.get_params."""
    rng = np.random.default_rng(seed)
    area = width * height
    frac = rng.uniform(scale[0], scale[1], size=(n, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, 10)))
    w = np.round(np.sqrt(area * frac * aspect))
    h = np.round(np.sqrt(area * frac / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)
    hit = ok.any(axis=1)
    rows = np.arange(n)
    return w[rows, first][hit], h[rows, first][hit], hit.mean()


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (1000, 1000)])
def test_crop_statistics_match_spec(width, height):
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 20000
    rng = np.random.default_rng(123)
    boxes = np.array([sample_crop(width, height, scale, ratio, rng) for _ in range(n)])
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + w <= width).all() and (y + h <= height).all()
    frac = w * h / (width * height)
    aspect = w / h
    # rounding to whole pixels widens the ranges by a pixel at most
    assert frac.min() >= scale[0] * 0.95 and frac.max() <= 1.0
    assert aspect.min() >= ratio[0] * 0.98 and aspect.max() <= ratio[1] * 1.02
    sw, sh, _ = _spec_boxes(width, height, scale, ratio, n, seed=7)
    s_frac, s_aspect = sw * sh / (width * height), sw / sh
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(frac, q) - np.quantile(s_frac, q)) < 0.02, q
        assert abs(np.quantile(np.log(aspect), q) - np.quantile(np.log(s_aspect), q)) < 0.02, q
    # placement is uniform: the box centre spreads over the free range
    cx = (x + w / 2) / width
    assert 0.45 < cx.mean() < 0.55 and cx.min() < 0.2 and cx.max() > 0.8


def test_crop_fallback_is_centre_crop_at_nearest_ratio():
    rng = np.random.default_rng(0)
    # an area fraction > 1 never fits: 10 failed tries, then the fallback
    assert sample_crop(1000, 200, (1.5, 2.0), (3 / 4, 4 / 3), rng) == (366, 0, 267, 200)
    assert sample_crop(200, 1000, (1.5, 2.0), (3 / 4, 4 / 3), rng) == (0, 366, 200, 267)
    assert sample_crop(400, 350, (1.5, 2.0), (3 / 4, 4 / 3), rng) == (0, 0, 400, 350)


def test_flip_is_a_fair_coin(photo):
    img = np.ascontiguousarray(photo[:256, :256])
    ok, buf = cv2.imencode(".png", img)  # lossless, so flipped == mirrored exactly
    data = buf.tobytes()
    t = TrainTransform(256, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    ref = img[:, :, ::-1]
    rng = np.random.default_rng(9)
    flipped = 0
    for _ in range(400):
        out = t(data, rng)
        if np.array_equal(out, ref):
            continue
        assert np.array_equal(out, ref[:, ::-1])
        flipped += 1
    assert 150 < flipped < 250
    assert all(np.array_equal(TrainTransform(256, (1, 1), (1, 1), flip=False)(data, rng), ref)
               for _ in range(20))


# --- DCT-scaled decoding --------------------------------------------------------------------

def test_dct_path_is_taken_and_matches_full_decode(jpegs, monkeypatch):
    data = jpegs["large"]  # 1600x1200: crops of >= 2*112 px per side are common
    flags_seen = []
    real = decode._imdecode

    def spy(buf, flags, *why):
        flags_seen.append(flags)
        return real(buf, flags, *why)

    monkeypatch.setattr(decode, "_imdecode", spy)
    # the whole-image cv2 path (the crop-decode path: tests/test_cropdecode.py)
    fast = TrainTransform(112, crop_decode=False)
    full = TrainTransform(112, dct_scaling=False, crop_decode=False)
    diffs = []
    for seed in range(40):
        a = fast(data, np.random.default_rng(seed))
        b = full(data, np.random.default_rng(seed))
        diffs.append(np.abs(a.astype(np.int16) - b).mean())
    reduced = [f for f in flags_seen[::2] if f != decode._FULL]
    assert len(reduced) >= 20, "most crops of a 1600x1200 image allow a scaled decode"
    assert {f & ~cv2.IMREAD_IGNORE_ORIENTATION for f in reduced} >= {
        cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_COLOR_4}
    assert all(f & cv2.IMREAD_IGNORE_ORIENTATION for f in flags_seen)
    assert np.mean(diffs) < 4.0 and max(diffs) < 8.0, diffs


def test_dct_scale_keeps_at_least_size_pixels(jpegs, monkeypatch):
    data = jpegs["large"]
    seen = []
    real = decode._imdecode

    def spy(buf, flags, *why):
        img = real(buf, flags, *why)
        seen.append(img.shape)
        return img

    monkeypatch.setattr(decode, "_imdecode", spy)
    t = TrainTransform(224, crop_decode=False)  # cv2 path; crop-decode path: test_cropdecode
    for seed in range(50):
        rng = np.random.default_rng(seed)
        x, y, w, h = sample_crop(1600, 1200, t.scale, t.ratio, np.random.default_rng(seed))
        t(data, rng)
        denom = 1600 / seen[-1][1]
        # the reduced crop still shrinks >= 2x (REDUCING_GAP): pixels stay torchvision's
        if denom > 1:
            assert w / denom >= 2 * 224 - 1 and h / denom >= 2 * 224 - 1
        if w >= 4 * denom * 224 and h >= 4 * denom * 224:
            assert denom == 8, "the largest allowed reduction is used"


def test_val_uses_reduced_decode_when_shorter_side_allows(jpegs, monkeypatch):
    seen = []
    real = decode._imdecode
    monkeypatch.setattr(decode, "_imdecode", lambda b, f: seen.append(f) or real(b, f))
    a = ValTransform()(jpegs["large"])  # 1200 short side: 1/2 gives 600 >= 2 x 256, 1/4 not
    assert seen[-1] & ~cv2.IMREAD_IGNORE_ORIENTATION == cv2.IMREAD_REDUCED_COLOR_2
    b = ValTransform(dct_scaling=False)(jpegs["large"])
    assert np.abs(a.astype(np.int16) - b).mean() < 0.5
    ValTransform()(jpegs["landscape"])  # 375 short side: no reduction possible
    assert seen[-1] == decode._FULL


# --- validation pixels vs an independent reference ------------------------------------------

def _reference_val(data, size=224, resize=256):
    """torchvision's Resize(256) + CenterCrop(224) on a PIL image, written out with PIL."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        r = im.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
        return np.asarray(r.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("name", ["landscape", "portrait", "tiny", "large"])
def test_val_pixels_match_pil_reference(jpegs, name):
    data = jpegs[name]
    diff = np.abs(ValTransform()(data).astype(np.int16) - _reference_val(data))
    assert diff.mean() < 0.5 and np.quantile(diff, 0.99) <= 3, (diff.mean(), diff.max())
    if name != "large":  # no DCT scaling: the same filter, rounding apart
        assert diff.max() <= 1


def test_val_fast_filter_is_an_explicit_option_with_other_pixels(jpegs):
    data = jpegs["landscape"]
    diff = np.abs(ValTransform(antialias=False)(data).astype(np.int16) - _reference_val(data))
    assert diff.mean() > 0.5  # measured ~1.6: the reason antialias is the default


def test_train_full_crop_matches_reference(photo):
    """scale=ratio=1 on a square image: the output is the whole image resized (plus flip)."""
    data = imagenet_like_jpeg(photo, np.random.default_rng(4), (300, 300))
    out = TrainTransform(200, (1, 1), (1, 1), flip=False)(data, np.random.default_rng(0))
    ref = np.asarray(Image.fromarray(pil_rgb(data)).resize((200, 200), Image.BILINEAR))
    assert np.abs(out.astype(np.int16) - ref).max() <= 1


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"not an image at all" * 10, b"\xff\xd8\xff\xe0" + b"\0" * 50,
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_raises_decode_error(data):
    rng = np.random.default_rng(0)
    for call in (lambda: TrainTransform()(data, rng), lambda: ValTransform()(data),
                 lambda: PILTransform(None)(data)):
        with pytest.raises(DecodeError) as e:
            call()
        assert isinstance(e.value, ValueError)
        assert str(len(data)) in str(e.value) or "empty" in str(e.value)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="size=0"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(scale=(1.0, 0.08))
    with pytest.raises(ValueError, match="ratio"):
        TrainTransform(ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="size=300 > resize=256"):
        ValTransform(300)


# --- PIL path -------------------------------------------------------------------------------

def test_pil_transform_gives_pil_rgb(jpegs, photo):
    data = jpegs["landscape"]
    assert np.array_equal(PILTransform(None)(data), pil_rgb(data))
    gray = encode_pil(Image.fromarray(photo[:, :, 0]), quality=90)
    out = PILTransform(None)(gray)
    assert out.shape[2] == 3
    sizes = PILTransform(lambda im: (im.mode, im.size))(data)
    assert sizes == ("RGB", (500, 375))


def _noisy(im):
    import random

    import torch

    return torch.rand(3).tolist() + [random.random()]


def test_pil_transform_seeds_torch_from_rng(jpegs):
    torch = pytest.importorskip("torch")
    t = pickle.loads(pickle.dumps(PILTransform(_noisy)))
    data = jpegs["tiny"]
    a = t(data, np.random.default_rng(1))
    assert a == t(data, np.random.default_rng(1))
    assert a != t(data, np.random.default_rng(2))
    state = torch.get_rng_state()
    t(data, np.random.default_rng(3))
    assert torch.equal(state, torch.get_rng_state()), "global torch RNG left as it was"


def test_accepts_memoryview_records(jpegs):
    """The reader hands out zero-copy views of LMDB values."""
    data = jpegs["large"]
    view = memoryview(b"\0\0\0\0" + data)[4:]
    assert jpeg_size(view) == (1600, 1200)
    assert np.array_equal(TrainTransform()(view, np.random.default_rng(0)),
                          TrainTransform()(data, np.random.default_rng(0)))
    assert np.array_equal(ValTransform()(view), ValTransform()(data))
    assert np.array_equal(PILTransform(None)(view), PILTransform(None)(data))
    with pytest.raises(DecodeError, match="35 bytes"):
        TrainTransform()(memoryview(b"garbage" * 5), np.random.default_rng(0))
