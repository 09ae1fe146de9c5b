"""The Loader's GPU options on a machine where torch sees no CUDA device: a clear error at
construction for ``device='cuda'``, a warning for ``pin_memory=True`` (CUDA tests that use them
for real are in tests/test_gpu_check.py and tests/test_dali.py, marked ``gpu``)."""
import subprocess
import sys
import warnings

import pytest
import torch

from imagenet_seq.data import Loader

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_device_without_cuda_is_refused_at_construction(sample_lmdb, device):
    with pytest.raises(ValueError) as e:
        Loader(sample_lmdb, "val", batch_size=4, num_workers=0, device=device)
    msg = str(e.value)
    assert repr(device) in msg and "no CUDA device" in msg and "device='cpu'" in msg


def test_device_that_is_not_a_device_is_refused(sample_lmdb):
    with pytest.raises(ValueError, match=r"device='gpu0' is not a torch device"):
        Loader(sample_lmdb, "val", batch_size=4, num_workers=0, device="gpu0")


@no_cuda
def test_pin_memory_without_cuda_warns_and_still_loads(sample_lmdb, monkeypatch):
    from imagenet_seq.loader import config

    monkeypatch.setattr(config, "_pin_warned", False)  # said once per process: maybe already
    with pytest.warns(RuntimeWarning, match="pin_memory=True has no effect"):
        ld = Loader(sample_lmdb, "val", batch_size=4, num_workers=0, pin_memory=True)
    with ld:
        x, y = next(iter(ld))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 224, 224) and not x.is_pinned()


def test_cpu_device_and_plain_loader_do_not_warn(sample_lmdb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Loader(sample_lmdb, "val", batch_size=4, num_workers=0, device="cpu").close()
        Loader(sample_lmdb, "val", batch_size=4, num_workers=0).close()


PIN_SCRIPT = """
import sys
from imagenet_seq.data import Loader
root = sys.argv[1]
train = Loader(root, "train", batch_size=4, num_workers=0, pin_memory=True)
val = Loader(root, "val", batch_size=4, num_workers=0, pin_memory=True)
next(iter(train)); next(iter(val))
train.close(); val.close()
print("ok")
"""


@no_cuda
def test_pin_memory_warning_once_per_process(sample_lmdb):
    """PyTorch's example makes a train and a val Loader per rank with pin_memory=True: one
    warning per process, not one per Loader (Python's default filter shows each call site)."""
    out = subprocess.run([sys.executable, "-W", "default", "-c", PIN_SCRIPT, sample_lmdb],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert out.stderr.count("pin_memory=True has no effect") == 1, out.stderr
