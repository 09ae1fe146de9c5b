"""The converter validates JPEGs with a 1/8-scale decode: it must reject exactly the files the
full-size decode rejects (truncations, damaged headers and scans, progressive files)."""
import cv2
import numpy as np
import pytest

from imagenet_seq.convert.images import BrokenImage, _decode_cv2, normalise
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg


def _damaged(rng):
    """(name, bytes) of ImageNet-like JPEGs, baseline and progressive, cut and bit-flipped."""
    photos = _photos()
    out = []
    for i in range(6):
        jpeg = imagenet_like_jpeg(photos[i % len(photos)][1], rng)
        if i % 2:  # progressive: several scans, a failure can sit in a late one
            img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
        out.append((f"{i}-intact", jpeg))
        for frac in (0.02, 0.1, 0.5, 0.9, 0.999):
            out.append((f"{i}-cut{frac}", jpeg[:max(4, int(len(jpeg) * frac))]))
        for k in range(8):
            b = bytearray(jpeg)
            pos = int(rng.integers(2, len(b)))
            b[pos] ^= 1 << int(rng.integers(0, 8))
            out.append((f"{i}-flip{pos}", bytes(b)))
        b = bytearray(jpeg)
        start = len(b) // 3
        b[start:start + 64] = bytes(64)  # a run of zeros inside the scan
        out.append((f"{i}-zeros", bytes(b)))
    return out


def test_check_decode_rejects_what_the_full_decode_rejects():
    cases = _damaged(np.random.default_rng(7))
    verdicts = [(name, _decode_cv2(d) is None, _decode_cv2(d, check_only=True) is None)
                for name, d in cases]
    differ = [(n, full, check) for n, full, check in verdicts if full != check]
    assert not differ, differ
    assert sum(full for _, full, _ in verdicts) >= 6  # the corpus holds rejected files


@pytest.mark.parametrize("max_size", [None, 200])
def test_normalise_keeps_intact_and_refuses_truncated(max_size):
    rng = np.random.default_rng(3)
    jpeg = imagenet_like_jpeg(_photos()[0][1], rng)
    out, note = normalise(jpeg, max_size=max_size)
    if max_size is None:
        assert out == jpeg and note is None
    else:
        img = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR)
        assert max(img.shape[:2]) == 200 and note.startswith("resized")
    with pytest.raises(BrokenImage):
        normalise(jpeg[:len(jpeg) // 2], max_size=max_size)
