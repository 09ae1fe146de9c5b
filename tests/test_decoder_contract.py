"""One contract for every decoder (issue 13, item 2): decoders x worker types.

Whatever decodes -- the OpenCV path inline, in threads or in processes, DALI (its CPU backend
here), a user callable -- a skipped record is counted and named, ``last_batch_records`` lines
up with the images and targets, and ``device=`` hands out normalised float images.
"""

import cv2
import numpy as np
import pytest
import torch

from imagenet_seq.data import IMAGENET_MEAN, IMAGENET_STD, Loader
from imagenet_seq.read.reader import SplitReader

from damaged import write_broken_lmdb

BAD = 7
SMALL = dict(batch_size=5, chunk_size=4, buffer_size=8, seed=1, image_size=32)


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def broken(sample_lmdb, tmp_path_factory):
    return write_broken_lmdb(sample_lmdb, str(tmp_path_factory.mktemp("broken")), BAD)


def _cv2_images(jpegs):
    out, skipped = [], []
    for i, j in enumerate(jpegs):
        img = cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            skipped.append(i)
            continue
        img = cv2.resize(img, (32, 32))[:, :, ::-1]
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    images = torch.stack(out) if out else torch.empty((0, 3, 32, 32), dtype=torch.uint8)
    return images, skipped


def returns_skipped(jpegs, labels):
    images, skipped = _cv2_images(jpegs)
    keep = [i for i in range(len(jpegs)) if i not in skipped]
    return images, torch.as_tensor(np.asarray(labels)[keep]), skipped


class NamesThemLikeDali:
    last_skipped = []

    def __call__(self, jpegs, labels):
        images, self.last_skipped = _cv2_images(jpegs)
        keep = [i for i in range(len(jpegs)) if i not in self.last_skipped]
        return images, torch.as_tensor(np.asarray(labels)[keep])


def dali_or_skip():
    pytest.importorskip("nvidia.dali")
    return "dali"


DECODERS = {
    "cpu-inline": lambda: dict(decoder="cpu", num_workers=0),
    "cpu-thread": lambda: dict(decoder="cpu", num_workers=2, worker_type="thread"),
    "cpu-process": lambda: dict(decoder="cpu", num_workers=2, worker_type="process"),
    "dali-cpu": lambda: dict(decoder=dali_or_skip(), num_workers=0),
    "dali-cpu-process": lambda: dict(decoder=dali_or_skip(), num_workers=2,
                                     worker_type="process"),
    "callable-3tuple": lambda: dict(decoder=returns_skipped, num_workers=0),
    "callable-thread": lambda: dict(decoder=returns_skipped, num_workers=2, worker_type="thread"),
    "callable-last_skipped": lambda: dict(decoder=NamesThemLikeDali(), num_workers=0),
}


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_decoder_skips_counts_and_lines_up(broken, name, device):
    labels = SplitReader(broken, "train").labels
    ld = Loader(broken, "train", skip_broken=True, device=device, **SMALL, **DECODERS[name]())
    seen = []
    with ld:
        for k, (x, y) in enumerate(ld):
            recs = ld.last_batch_records
            assert len(x) == len(y) == len(recs), f"batch {k}"
            assert y.tolist() == labels[recs].tolist(), "targets follow the records"
            assert x.shape[1:] == (3, 32, 32)
            if device is None:
                assert x.dtype == torch.uint8
            else:  # normalised on the device, whichever decoder made the batch
                assert x.dtype == torch.float32 and x.device.type == "cpu"
                lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
                hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
                assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4
            seen.extend(recs.tolist())
    assert sorted(seen) == [i for i in range(48) if i != BAD]
    assert ld.skipped == 1 and ld.skipped_records[0][0] == BAD
    assert isinstance(ld.skipped_records[0][1], str) and ld.skipped_records[0][1]


def test_device_normalisation_is_the_same_for_every_decoder(sample_lmdb):
    """The same uint8 batch -> the same float batch, whichever stage made the uint8."""
    kw = dict(batch_size=4, num_workers=0)
    u8 = Loader(sample_lmdb, "val", **kw)
    x, _ = next(iter(u8))
    const = lambda j, l: (x[:len(j)].clone(), torch.as_tensor(l))  # noqa: E731
    a, _ = next(iter(Loader(sample_lmdb, "val", device="cpu", **kw)))
    b, _ = next(iter(Loader(sample_lmdb, "val", device="cpu", decoder=const, **kw)))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_a_decoder_that_drops_records_silently_is_an_error(sample_lmdb):
    drops = lambda j, l: (torch.zeros((len(j) - 1, 3, 8, 8), dtype=torch.uint8),  # noqa: E731
                          torch.as_tensor(l)[1:])
    ld = Loader(sample_lmdb, "val", batch_size=4, num_workers=0, decoder=drops)
    with pytest.raises(ValueError, match=r"returned 3 images and 3 targets for 4 records.*"
                                         r"must name their positions"):
        next(iter(ld))
    ld.close()
    bad = lambda j, l: "nope"  # noqa: E731
    with pytest.raises(TypeError, match="expected \\(images, targets\\)"):
        next(iter(Loader(sample_lmdb, "val", batch_size=4, num_workers=0, decoder=bad)))
