"""Crop-only JPEG decoding (imagenet_seq.decode._jpegcrop) and TrainTransform's use of it.

Pixel standard: the extension decodes a box with the system libjpeg-turbo; the reference is
cv2.imdecode of the whole image at the same DCT scale (OpenCV bundles its own libjpeg-turbo),
then sliced. Measured identical on every box tried here (OpenCV 5's libjpeg-turbo 3.1.2 vs
Debian's 2.1.5: same ISLOW IDCT, same fancy upsampling). The comparison with OpenCV allows one
grey level on <= 0.1 % of the pixels, so another OpenCV wheel's libjpeg-turbo build cannot fail
it while a real bug cannot pass: an off-by-one box shifts every pixel, and decoding without the
extra edge columns changes the box's first/last column by up to 30 levels. Crop vs whole image
through the extension itself (one library) must be exact.
"""
import io
import os
import pickle
import threading

import cv2
import numpy as np
import psutil
import pytest
from PIL import Image

from imagenet_seq.decode import transforms as decode
from imagenet_seq.decode.transforms import DecodeError, TrainTransform, jpeg_size
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg

jc = decode._jpegcrop
needs_ext = pytest.mark.skipif(
    jc is None, reason="imagenet_seq.decode._jpegcrop is not built (libjpeg headers were missing at "
    "install: apt-get install libjpeg62-turbo-dev, then pip install -e . again)")

_READ = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
         8: cv2.IMREAD_REDUCED_COLOR_8}
_SAMPLING = {"444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
             "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
             "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
             "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440}


def _encode_cv2(img, quality=90, sampling="420", **extra):
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              _SAMPLING[sampling]]
    if extra.get("progressive"):
        params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    if extra.get("restart"):
        params += [cv2.IMWRITE_JPEG_RST_INTERVAL, extra["restart"]]
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    return buf.tobytes()


def _encode_pil(img_bgr, mode="RGB", **kw):
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img_bgr[:, :, ::-1])).convert(mode).save(
        buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return [p for _, p in _photos()]


@pytest.fixture(scope="module")
def variants(photos):
    """name -> JPEG bytes: ImageNet-like photos and every layout the decoder must handle."""
    odd = cv2.resize(photos[1], (333, 221), interpolation=cv2.INTER_AREA)  # not /8 nor /16
    odd2 = cv2.resize(photos[2], (517, 389), interpolation=cv2.INTER_AREA)
    out = {
        "landscape": imagenet_like_jpeg(photos[0], np.random.default_rng(1), (500, 375)),
        "portrait": imagenet_like_jpeg(photos[3], np.random.default_rng(2), (375, 500)),
        "large": imagenet_like_jpeg(photos[4], np.random.default_rng(3), (1600, 1200)),
        "progressive": _encode_pil(odd2, quality=90, progressive=True),
        "progressive_444": _encode_cv2(odd, 92, "444", progressive=True),
        "gray": _encode_pil(odd2, "L", quality=90),
        "gray_progressive": _encode_pil(odd, "L", quality=90, progressive=True),
        "restart_markers": _encode_cv2(odd2, 90, "420", restart=3),
        "tiny": _encode_cv2(cv2.resize(photos[5], (13, 9)), 90, "420"),
        "one_pixel": _encode_cv2(photos[6][:1, :1], 90, "420"),
    }
    for s in _SAMPLING:
        out[f"odd_{s}"] = _encode_cv2(odd, 90, s)
        out[f"odd2_{s}"] = _encode_cv2(odd2, 90, s)
    return out


def _cv2_whole(data, denom):
    return cv2.imdecode(np.frombuffer(data, np.uint8),
                        _READ[denom] | cv2.IMREAD_IGNORE_ORIENTATION)


def _cv2_box(data, denom, box):
    x, y, w, h = box
    return _cv2_whole(data, denom)[y:y + h, x:x + w]


def _ext_box(data, denom, box):
    x, y, w, h = box
    return np.frombuffer(jc.decode_crop(data, x, y, w, h, denom), np.uint8).reshape(h, w, 3)


def _scaled_dims(data, denom):
    width, height = jpeg_size(data)
    return -(-width // denom), -(-height // denom)


def _boxes(width, height, rng, n):
    """n random boxes plus every edge case: each side touching the image edge, the whole
    image, single pixels in the corners, thin strips on iMCU boundaries."""
    boxes = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, 1, 1),
             (0, height - 1, width, 1), (width - 1, 0, 1, height)]
    for x in (8, 15, 16, 17, 32):
        if x < width:
            boxes.append((x, 0, 1, height))
            boxes.append((x, 0, width - x, height))
    for y in (8, 15, 16, 17, 32):
        if y < height:
            boxes.append((0, y, width, height - y))
            boxes.append((0, y, width, 1))
    for _ in range(n):
        w = int(rng.integers(1, width + 1))
        h = int(rng.integers(1, height + 1))
        x = int(rng.choice([0, width - w, rng.integers(0, width - w + 1)]))
        y = int(rng.choice([0, height - h, rng.integers(0, height - h + 1)]))
        boxes.append((x, y, w, h))
    return boxes


# --- the build ------------------------------------------------------------------------------

def test_extension_built_where_libjpeg_headers_exist():
    """CI installs libjpeg62-turbo-dev: losing the extension there must fail, not skip."""
    headers = [p for p in ("/usr/include/jpeglib.h", "/usr/local/include/jpeglib.h")
               if os.path.exists(p)]
    if not headers:
        pytest.skip("no jpeglib.h on this machine: the extension is optional here")
    assert jc is not None, (f"{headers[0]} exists but imagenet_seq.decode._jpegcrop did not import; "
                            "rebuild: pip install -e . (or python setup.py build_ext --inplace)")


# --- the extension alone --------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("denom", [1, 2, 4, 8])
def test_crop_equals_slice_of_whole_decode(variants, denom):
    """Same library both ways: cropping, skipping and edge widening change no pixel."""
    rng = np.random.default_rng(denom)
    for name, data in variants.items():
        width, height = _scaled_dims(data, denom)
        whole = _ext_box(data, denom, (0, 0, width, height))
        for x, y, w, h in _boxes(width, height, rng, 25):
            assert np.array_equal(_ext_box(data, denom, (x, y, w, h)),
                                  whole[y:y + h, x:x + w]), (name, denom, (x, y, w, h))


@needs_ext
@pytest.mark.parametrize("denom", [1, 2, 4, 8])
def test_pixels_match_opencv(variants, denom):
    rng = np.random.default_rng(10 + denom)
    total = differing = 0
    for name, data in variants.items():
        ref = _cv2_whole(data, denom)
        assert _scaled_dims(data, denom) == ref.shape[1::-1], "libjpeg gives ceil(side / denom)"
        for box in _boxes(*ref.shape[1::-1], rng, 15):
            x, y, w, h = box
            diff = np.abs(_ext_box(data, denom, box).astype(np.int16) - ref[y:y + h, x:x + w])
            assert diff.max() <= 1, (name, denom, box, int(diff.max()))
            total += diff.size
            differing += int(np.count_nonzero(diff))
    assert differing <= 0.001 * total, f"{differing} of {total} values differ"


@needs_ext
def test_writes_into_a_given_buffer_and_rejects_bad_arguments(variants):
    data = variants["landscape"]
    out = np.full(40 * 30 * 3 + 7, 255, np.uint8)
    assert jc.decode_crop(data, 5, 6, 40, 30, 1, out) is out
    assert np.array_equal(out[:3600].reshape(30, 40, 3), _cv2_box(data, 1, (5, 6, 40, 30)))
    assert (out[3600:] == 255).all(), "nothing is written past the box"
    assert bytes(jc.decode_crop(memoryview(data), 0, 0, 4, 4, denom=8)) == \
        _cv2_box(data, 8, (0, 0, 4, 4)).tobytes()
    for args, match in [((0, 0, 10, 10, 3), "denom=3"),
                        ((0, 0, 0, 10, 1), "w, h > 0"),
                        ((491, 0, 10, 10, 1), "not inside the 500x375 image at scale 1/1"),
                        ((60, 0, 4, 4, 8), "not inside the 63x47 image at scale 1/8"),
                        ((-1, 0, 4, 4, 1), "not inside")]:
        with pytest.raises(ValueError, match=match):
            jc.decode_crop(data, *args)
    with pytest.raises(ValueError, match="out holds 10 bytes"):
        jc.decode_crop(data, 0, 0, 10, 10, 1, bytearray(10))


@needs_ext
def test_broken_data_raises_jpeg_error_quietly(variants, capfd):
    data = variants["landscape"]
    cases = {"empty": b"", "garbage": b"not a jpeg" * 20, "header only": data[:300],
             "truncated": data[:len(data) // 2], "no end-of-image marker": data[:-2]}
    for name, bad in cases.items():
        with pytest.raises(jc.JpegError) as e:
            jc.decode_crop(bad, 0, 0, 8, 8, 1)
        assert isinstance(e.value, ValueError) and str(e.value), name
    # corrupt entropy data: libjpeg warns and repairs; no exception, nothing printed
    corrupt = data[:20000] + bytes(200) + data[20200:]
    assert len(jc.decode_crop(corrupt, 0, 300, 100, 50, 1)) == 100 * 50 * 3
    assert capfd.readouterr().err == ""


@needs_ext
def test_cmyk_is_unsupported(photos):
    cmyk = _encode_pil(cv2.resize(photos[0], (120, 90)), "CMYK", quality=92)
    with pytest.raises(jc.UnsupportedError, match="CMYK"):
        jc.decode_crop(cmyk, 0, 0, 8, 8, 1)


@needs_ext
def test_no_memory_leak_over_thousands_of_decodes(variants, photos):
    cmyk = _encode_pil(cv2.resize(photos[0], (120, 90)), "CMYK", quality=92)
    good = variants["odd_420"]
    cases = [good, variants["progressive_444"], good[:len(good) // 2], b"", b"xy" * 50, cmyk,
             good[:200]]
    proc = psutil.Process()

    def loop(n):
        for i in range(n):
            for data in cases:
                try:
                    jc.decode_crop(data, i % 50, i % 40, 60, 50, (1, 2)[i % 2])
                except ValueError:
                    pass

    loop(200)  # allocator warm-up
    before = proc.memory_info().rss
    loop(1000)  # 7000 decodes, 4000 of them failing
    growth = proc.memory_info().rss - before
    assert growth < 4 << 20, f"RSS grew {growth / 2 ** 20:.1f} MiB over 7000 decodes"


@needs_ext
def test_gil_is_released_while_decoding(photos):
    """The main thread runs Python while another thread is inside decode_crop."""
    big = _encode_cv2(cv2.resize(photos[0], (4000, 3000)), 95, "444")
    span = {}

    def work():
        span["start"] = cv2.getTickCount()
        for _ in range(3):
            jc.decode_crop(big, 0, 0, 4000, 3000, 1)
        span["end"] = cv2.getTickCount()

    t = threading.Thread(target=work)
    ticks = []
    t.start()
    while t.is_alive():
        ticks.append(cv2.getTickCount())
    t.join()
    inside = [k for k in ticks if span["start"] < k < span["end"]]
    assert len(inside) > 100, "the main thread was blocked: decode_crop holds the GIL"


# --- TrainTransform -------------------------------------------------------------------------

def _train_outputs(t, data, seeds):
    return [t(data, np.random.default_rng(s)) for s in seeds]


@needs_ext
@pytest.mark.parametrize("size", [224, 96])
def test_train_transform_same_output_with_and_without_crop_decode(variants, size):
    for dct in (True, False):
        on = TrainTransform(size, dct_scaling=dct)
        off = TrainTransform(size, dct_scaling=dct, crop_decode=False)
        for name, data in variants.items():
            for s in range(12):
                assert np.array_equal(on(data, np.random.default_rng(s)),
                                      off(data, np.random.default_rng(s))), (name, dct, s)


@needs_ext
def test_train_crop_decode_path_and_scale_are_used(variants, monkeypatch):
    calls = []
    real = jc.decode_crop

    class Spy:
        JpegError, UnsupportedError = jc.JpegError, jc.UnsupportedError

        @staticmethod
        def decode_crop(data, x, y, w, h, denom, out):
            calls.append((w, h, denom))
            return real(data, x, y, w, h, denom, out)

    monkeypatch.setattr(decode, "_jpegcrop", Spy)
    monkeypatch.setattr(decode, "_imdecode", lambda *a: pytest.fail("cv2 path taken"))
    t = TrainTransform(112)
    for s in range(60):
        t(variants["large"], np.random.default_rng(s))
    assert len(calls) == 60
    assert {d for _, _, d in calls} >= {2, 4}, "1600x1200 crops allow reduced decodes"
    for w, h, denom in calls:
        # a reduced box still shrinks >= 2x (resize.REDUCING_GAP) at the chosen scale
        if denom > 1:
            assert min(w, h) >= 2 * 112 - 1
        if denom < 8:
            assert min(w, h) < 4 * 112 + 1, "the largest allowed reduction is used"


def test_train_without_extension_uses_cv2(variants, monkeypatch):
    data = variants["landscape"]
    ref = _train_outputs(TrainTransform(crop_decode=False), data, range(5))
    monkeypatch.setattr(decode, "_jpegcrop", None)
    monkeypatch.setattr(decode, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="crop-decode extension"):  # said once, with the fix
        t = TrainTransform()
    assert all(np.array_equal(a, b) for a, b in zip(_train_outputs(t, data, range(5)), ref))


@needs_ext
def test_train_cmyk_falls_back_to_cv2(photos, monkeypatch):
    cmyk = _encode_pil(cv2.resize(photos[0], (500, 375)), "CMYK", quality=92)
    ref = _train_outputs(TrainTransform(crop_decode=False), cmyk, range(5))
    flags = []
    real = decode._imdecode
    monkeypatch.setattr(decode, "_imdecode", lambda b, f, *w: flags.append(f) or real(b, f, *w))
    out = _train_outputs(TrainTransform(), cmyk, range(5))
    assert len(flags) == 5, "each CMYK image went to cv2"
    assert all(np.array_equal(a, b) for a, b in zip(out, ref))


@needs_ext
def test_train_libjpeg_error_defers_to_opencv(variants, monkeypatch):
    """Where the system libjpeg fails, OpenCV's decides: its image, or DecodeError naming both."""
    class Failing:
        JpegError, UnsupportedError = jc.JpegError, jc.UnsupportedError

        @staticmethod
        def decode_crop(*args):
            raise jc.JpegError("Unsupported JPEG process (made up)")

    data = variants["landscape"]
    ref = _train_outputs(TrainTransform(crop_decode=False), data, range(3))
    monkeypatch.setattr(decode, "_jpegcrop", Failing)
    assert all(np.array_equal(a, b) for a, b in
               zip(_train_outputs(TrainTransform(), data, range(3)), ref))
    monkeypatch.undo()
    with pytest.raises(DecodeError, match=r"OpenCV cannot decode .*system libjpeg: truncated"):
        TrainTransform()(data[:len(data) // 2], np.random.default_rng(0))


@pytest.mark.parametrize("crop_decode", [True, False])
def test_train_broken_records_raise_decode_error(variants, crop_decode):
    data = variants["landscape"]
    t = TrainTransform(crop_decode=crop_decode)
    for bad in (b"", b"not a jpeg" * 20, data[:300], data[:len(data) // 2], data[:-2]):
        with pytest.raises(DecodeError):
            t(bad, np.random.default_rng(0))


@needs_ext
def test_train_corrupt_data_decodes_like_opencv_and_quietly(variants, capfd):
    """Corrupt entropy data that libjpeg repairs: OpenCV decodes it (printing a libjpeg warning
    to stderr); the crop path gives the same pixels and prints nothing."""
    data = variants["landscape"]
    corrupt = data[:20000] + bytes(200) + data[20200:]
    ref = _train_outputs(TrainTransform(crop_decode=False), corrupt, range(8))
    capfd.readouterr()
    out = _train_outputs(TrainTransform(), corrupt, range(8))
    assert capfd.readouterr().err == ""
    assert all(np.array_equal(a, b) for a, b in zip(out, ref))


@needs_ext
def test_threads_decode_concurrently_with_serial_results(variants):
    t = TrainTransform(128)
    items = [(data, s) for data in variants.values() for s in range(6)]
    serial = [t(data, np.random.default_rng(s)) for data, s in items]
    results = [None] * len(items)
    barrier = threading.Barrier(4)

    def work(k):
        barrier.wait()
        for i in range(k, len(items), 4):
            data, s = items[i]
            results[i] = t(data, np.random.default_rng(s))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, serial))


def test_crop_decode_flag_in_repr_and_pickle():
    t = TrainTransform(96, crop_decode=False)
    assert "crop_decode=False" in repr(t)
    assert pickle.loads(pickle.dumps(t)).crop_decode is False
    assert TrainTransform().crop_decode is True
