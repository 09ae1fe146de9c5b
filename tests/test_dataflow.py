"""imagenet_seq.dataflow with tensorpack's real stages: BatchData, MultiProcessRunnerZMQ,
MultiProcessMapDataZMQ, LocallyShuffleData, TestDataSpeed (QueueInput needs TensorFlow)."""
import contextlib
import importlib.util
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tensorpack.dataflow")

from imagenet_seq import dataflow as isdf  # noqa: E402
from imagenet_seq.data import Loader  # noqa: E402
from import_errors import import_error  # noqa: E402

td = isdf.import_tensorpack()
SMALL = dict(image_size=32, resize_size=40)


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


def _collect(ds, n=None):
    out = []
    for k, dp in enumerate(ds):
        out.append(dp)
        if n is not None and k + 1 == n:
            break
    return out


def test_import_is_quiet_and_numpy_untouched():
    code = textwrap.dedent("""
        import numpy as np
        import imagenet_seq.dataflow
        print("np.float" if "float" in np.__dict__ else "clean")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "clean"  # no "Failed to import tensorflow." and no alias set
    assert "Failed to import tensorflow" not in r.stderr


def test_numpy_compat_opt_in():
    code = "import numpy as np, imagenet_seq.dataflow as d; d.numpy_compat(); " \
           "assert np.float is float and np.object is object"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_source_contract_order_and_epochs(sample_lmdb):
    for rank in (0, 1):
        src = isdf.LMDBSource(sample_lmdb, "train", chunk_size=8, buffer_size=10, rank=rank,
                              world_size=2)
        ref = Loader(sample_lmdb, "train", chunk_size=8, buffer_size=10, rank=rank,
                     world_size=2, num_workers=0)
        assert isinstance(src, td.DataFlow)
        assert len(src) == ref.num_records == 48 // 2
        with pytest.raises(AssertionError, match="reset_state"):
            next(iter(src))
        src.reset_state()
        labels = ref.reader.labels
        for epoch in range(3):  # each iter() is the next epoch, in the Loader's order
            dps = _collect(src)
            assert len(dps) == len(src)
            order = ref.epoch_order(epoch)
            assert [dp[1] for dp in dps] == labels[order].tolist()
            assert all(isinstance(dp, list) and dp[0].dtype == np.uint8 and
                       bytes(dp[0][:2]) == b"\xff\xd8" for dp in dps)
        assert src.epoch == 3
        src.set_epoch(1)
        assert [dp[1] for dp in _collect(src)] == labels[ref.epoch_order(1)].tolist()
        assert src.epoch == 1  # fixed
    # val: file order, contiguous slice per rank, every record once
    seen = []
    for rank in (0, 1):
        v = isdf.LMDBSource(sample_lmdb, "val", rank=rank, world_size=2)
        v.reset_state()
        seen += [dp[1] for dp in _collect(v)]
    assert len(seen) == 12
    with pytest.raises(ValueError, match="epoch"):
        src.set_epoch(-1)


def test_decoder_matches_loader_pixels_on_val(sample_lmdb):
    src = isdf.LMDBSource(sample_lmdb, "val")
    ds = isdf.DecodeImage(src, "val", **SMALL)
    with pytest.raises(AssertionError, match="reset_state"):
        next(iter(ds))
    ds.reset_state()
    got = _collect(ds)
    ref = Loader(sample_lmdb, "val", batch_size=12, num_workers=0, channels_last=True, **SMALL)
    images, targets = next(iter(ref))
    assert np.array_equal(np.stack([dp[0] for dp in got]), images.permute(0, 2, 3, 1).numpy())
    assert [dp[1] for dp in got] == targets.tolist()


def test_tensorpack_pipeline_zmq_stages(sample_lmdb):
    """LMDBSource -> LocallyShuffleData -> MultiProcessRunnerZMQ -> MultiProcessMapDataZMQ
    (our decoder) -> BatchData -> TestDataSpeed, all real tensorpack stages."""
    ds = isdf.LMDBSource(sample_lmdb, "train", chunk_size=8, buffer_size=8)
    ds = td.LocallyShuffleData(ds, 16)
    ds = td.MultiProcessRunnerZMQ(ds, 1)
    ds = td.MultiProcessMapDataZMQ(ds, 2, isdf.ImageDecoder("train", **SMALL), buffer_size=8)
    ds = td.BatchData(ds, 8, remainder=True)
    assert len(ds) == 6
    with contextlib.redirect_stderr(io.StringIO()):
        ds = td.TestDataSpeed(ds, size=8)
        ds.reset_state()
        batches = _collect(ds, 8)  # TestDataSpeed ran 8 batches, then these 8
    assert len(batches) == 8
    for images, labels in batches:
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (8,) and set(labels.tolist()) <= set(range(4))
        assert images.std() > 1  # real pixels


def test_ready_flow(sample_lmdb):
    flow = isdf.LoaderFlow(sample_lmdb, "train", batch_size=10, num_workers=2, seed=3, **SMALL)
    assert len(flow) == 5  # 48 records: 4 full + 1 partial
    with pytest.raises(AssertionError, match="reset_state"):
        next(iter(flow))
    flow.reset_state()
    ref = Loader(sample_lmdb, "train", batch_size=10, num_workers=0, seed=3, **SMALL)
    for epoch in range(2):
        got = _collect(flow)
        ref.set_epoch(epoch)
        want = list(ref)
        assert [b[0].shape for b in got] == [(10, 32, 32, 3)] * 4 + [(8, 32, 32, 3)]
        for (im, lab), (wim, wlab) in zip(got, want):
            assert np.array_equal(im, wim.permute(0, 2, 3, 1).numpy())
            assert np.array_equal(lab, wlab.numpy())
    nchw = isdf.LoaderFlow(sample_lmdb, "val", layout="NCHW", batch_size=12, num_workers=1,
                           **SMALL)
    nchw.reset_state()
    (im, lab), = _collect(nchw)
    assert im.shape == (12, 3, 32, 32) and lab.dtype == np.int64


def test_ready_flow_in_runner_and_speed(sample_lmdb):
    flow = isdf.LoaderFlow(sample_lmdb, "train", batch_size=8, num_workers=1, **SMALL)
    ds = td.MultiProcessRunnerZMQ(flow, 1)
    with contextlib.redirect_stderr(io.StringIO()):
        ds = td.TestDataSpeed(ds, size=6)
        ds.reset_state()
        got = _collect(ds) + _collect(ds)  # the worker runs epoch after epoch
    assert len(got) == 12 and all(b[0].shape[1:] == (32, 32, 3) for b in got)
    # each epoch: 48 records in 6 full batches of 8
    assert sum(len(b[1]) for b in got) == 96


def test_not_reset_runner_raises_not_hangs(sample_lmdb):
    ds = td.MultiProcessRunnerZMQ(isdf.LMDBSource(sample_lmdb, "train"), 1)
    with pytest.raises(AttributeError):  # tensorpack's own: no socket before reset_state()
        next(iter(ds))


def test_file_open_in_parent_is_an_error_not_a_hang(sample_lmdb):
    """py-lmdb refuses, in a forked child, a file its parent had open: the runner's worker
    says so through tensorpack's exception channel (the parent raises; no hang)."""
    from imagenet_seq.read.reader import SplitReader

    held = SplitReader(sample_lmdb, "train")
    held.reset_state()  # the parent holds the file open while the worker forks
    try:
        ds = td.MultiProcessRunnerZMQ(isdf.LMDBSource(sample_lmdb, "train"), 1)
        ds.reset_state()
        with pytest.raises(RuntimeError, match="was open in the process that forked"):
            next(iter(ds))
    finally:
        held.close()


def test_bad_input(sample_lmdb):
    with pytest.raises(ValueError, match="layout"):
        isdf.LoaderFlow(sample_lmdb, "train", layout="HWC")
    with pytest.raises(ValueError, match="device"):
        isdf.LoaderFlow(sample_lmdb, "train", device="cpu")
    with pytest.raises(ValueError, match="mode"):
        isdf.ImageDecoder("test")
    for bad in (8, 15, 160.0, "160", True):
        with pytest.raises(ValueError, match="image_size"):
            isdf.ImageDecoder("train", image_size=bad)


def test_missing_or_old_tensorpack_names_pip_line(monkeypatch):
    import tensorpack

    monkeypatch.setattr(tensorpack, "__version__", "0.9.8")
    with pytest.raises(ImportError, match=r'pip install "imagenet_seq\[tensorpack\]" --upgrade'):
        isdf.import_tensorpack()
    out, both = import_error("import sys; sys.modules['tensorpack'] = None",
                             "imagenet_seq.dataflow", timeout=60)
    assert 'pip install "imagenet_seq[tensorpack]"' in out, both


def test_queue_input_needs_tensorflow(sample_lmdb):
    """tensorpack's trainers' QueueInput lives in TensorFlow-only modules."""
    if importlib.util.find_spec("tensorflow") is None:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(ImportError):
            import tensorpack.input_source  # noqa: F401
        pytest.skip("QueueInput needs TensorFlow (not installed): not tested")
    from tensorpack.input_source import QueueInput  # pragma: no cover - needs TensorFlow

    QueueInput(isdf.LMDBSource(sample_lmdb, "train"))  # pragma: no cover


def test_runner_picklable_decoder():
    import pickle

    dec = isdf.ImageDecoder("val", **SMALL)
    clone = pickle.loads(pickle.dumps(dec))
    assert clone.transform.size == 32 and clone._rng is None
