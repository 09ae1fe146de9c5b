"""tensorpack DataFlows over imagenet_seq's LMDBs: the project's own family, its contract.

Imported as ``imagenet_seq.dataflow`` (a re-export of this module).

    from imagenet_seq.dataflow import LMDBSource, DecodeImage, ImageDecoder, LoaderFlow
    from tensorpack.dataflow import BatchData, MultiProcessMapDataZMQ

    ds = LMDBSource('/data/lmdb', 'train')                        # [jpeg uint8 array, label]
    ds = MultiProcessMapDataZMQ(ds, 8, ImageDecoder('train'))     # [HWC uint8 RGB, label]
    ds = BatchData(ds, 256)                                       # [NHWC uint8, int labels]
    ds.reset_state()
    for images, labels in ds: ...

    ds = LoaderFlow('/data/lmdb', 'train', batch_size=256, num_workers=8)  # ready: batches
    ds.reset_state()

Every DataFlow here follows tensorpack's contract: ``reset_state()`` once per process before
iterating (iterating first raises ``AssertionError`` saying so, never hangs), an exact
``__len__``, datapoints as lists. Each ``iter()`` is one epoch, and the next ``iter()`` takes the
next epoch number, as tensorpack's runners expect (``set_epoch`` fixes it, like the Loader's).

* :class:`LMDBSource` -- ``[jpeg, label]`` in this project's exact-epoch order: the Loader's
  settings (:func:`imagenet_seq.loader.loader.settings_for`) and its pass builder
  (:func:`imagenet_seq.loader.feeder.record_stream`: chunk permutation, rank shares, shuffle
  buffer; ``LMDBSource(...).epoch_order(e)`` equals ``Loader(...).epoch_order(e)``), read as
  long sequential spans. Rank-aware like the Loader.
* :class:`ImageDecoder` (a picklable map function) / :class:`DecodeImage` (a DataFlow applying it
  inline) -- ``[jpeg, label] -> [image, label]`` through the Loader's fast path (crop-only DCT
  decode, torchvision's antialiased resize; ``imagenet_seq.decode.transforms``).
* :class:`LoaderFlow` -- the ready flow: the Loader itself (decode workers writing straight into
  the batch) yielding ``[images, labels]`` numpy batches, NHWC (tensorpack's and TF's layout,
  free: the batch is stored that way) or NCHW.

tensorpack is an optional extra: ``pip install "imagenet_seq[tensorpack]"``. Importing it prints
"Failed to import tensorflow." without TensorFlow; this module silences that line. tensorpack 0.11
still names ``np.float`` / ``np.object`` (removed in NumPy 1.24) in ``AugmentImageCoordinates``,
``NumpySerializer.save`` and ``utils.viz``; no stage here reaches them, and :func:`numpy_compat`
restores the two aliases for users who need those stages (opt-in: it changes ``numpy`` for the
whole process). ``QueueInput`` (tensorpack's trainers) needs TensorFlow; the DataFlows work with
it as with any DataFlow, untested here without TensorFlow.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from imagenet_seq.format import SPLITS
from imagenet_seq.format import TENSORPACK_PIP as _PIP
from imagenet_seq.integrations import version_tuple

TENSORPACK_MIN = (0, 11)


def import_tensorpack():
    """``tensorpack.dataflow``, imported quietly; ImportError naming the pip line otherwise."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Failed to import tensorflow."
            import tensorpack
            from tensorpack import dataflow
    except ImportError as e:
        raise ImportError(f"imagenet_seq.dataflow needs tensorpack >= "
                          f"{'.'.join(map(str, TENSORPACK_MIN))}: {_PIP} ({e})") from e
    version = getattr(tensorpack, "__version__", "0")
    if version_tuple(version) < TENSORPACK_MIN:
        raise ImportError(f"imagenet_seq.dataflow needs tensorpack >= "
                          f"{'.'.join(map(str, TENSORPACK_MIN))}, found {version}: "
                          f"{_PIP} --upgrade")
    return dataflow


def numpy_compat() -> None:
    """Restore ``np.float`` and ``np.object`` (aliases of ``float`` / ``object``) for tensorpack
    0.11 stages that still name them (``AugmentImageCoordinates``, ``NumpySerializer.save``).
    Opt-in: it changes ``numpy`` for the whole process. No stage of this module needs it."""
    for name, value in (("float", float), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, value)


_td = import_tensorpack()

__all__ = ["LMDBSource", "ImageDecoder", "DecodeImage", "LoaderFlow", "import_tensorpack",
           "numpy_compat"]

_NOT_RESET = ("{name}: call reset_state() before iterating (tensorpack's DataFlow contract: once "
              "in each process that iterates it, after any fork; tensorpack's runners and "
              "TestDataSpeed do it for the flows they wrap)")


class _Epochs:
    """Epoch numbering shared by the flows, the Loader's own (``loader.state.Cursor``): each
    ``iter()`` takes the next epoch unless ``set_epoch`` fixed it."""

    def _init_epochs(self) -> None:
        from imagenet_seq.loader.state import Cursor

        self._cursor, self._pid = Cursor(), None

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iterations (order and augmentation depend on it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r}; expected an int >= 0")
        self._cursor.set_epoch(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` reads."""
        return self._cursor.epoch

    def _next_epoch(self) -> int:
        if self._pid != os.getpid():
            raise AssertionError(_NOT_RESET.format(name=type(self).__name__))
        return self._cursor.start_pass()[0]


class LMDBSource(_Epochs, _td.RNGDataFlow):
    """``[jpeg, label]`` datapoints of one split, for this rank, in the Loader's epoch order.

    ``jpeg`` is a 1-D uint8 array of the record's bytes (what the original tool's LMDBs held,
    ready for ``cv2.imdecode``), ``label`` an int. ``len()`` = this rank's records per epoch.

    Args:
        root: folder holding ``ILSVRC-<split>.lmdb`` (or the file).
        split: ``'train'`` or ``'val'``.
        shuffle, seed, chunk_size, buffer_size, buffer_bytes, rank, world_size, distributed,
            check_split: as for :class:`imagenet_seq.data.Loader` (same defaults, same order).
    """

    def __init__(self, root: str, split: str = "train", *, shuffle: Optional[bool] = None,
                 seed: int = 0, chunk_size: Optional[int] = None,
                 buffer_size: Optional[int] = None, buffer_bytes: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 distributed: Optional[bool] = None, check_split: bool = True):
        from imagenet_seq.loader.loader import settings_for

        self.settings, self.reader = settings_for(
            root, split, shuffle=shuffle, seed=seed, chunk_size=chunk_size,
            buffer_size=buffer_size, buffer_bytes=buffer_bytes, rank=rank,
            world_size=world_size, distributed=distributed, num_workers=0,
            check_split=check_split)
        self._init_epochs()

    @property
    def classes(self) -> List[str]:
        return list(self.settings.data.classes)

    def __len__(self) -> int:
        return self.settings.order.records

    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """Record indices in the order ``epoch`` yields them (no data read)."""
        return self.settings.order.plan.epoch_order(self.epoch if epoch is None else epoch)

    def reset_state(self) -> None:
        super().reset_state()  # tensorpack's RNG (unused: the order is the plan's)
        self._pid = os.getpid()

    def close(self) -> None:
        """Release this process's handle on the file (also done at the end of every epoch)."""
        self.reader.close()

    def __iter__(self) -> Iterator[list]:
        from imagenet_seq.loader.feeder import record_stream

        epoch = self._next_epoch()
        # the file is opened here, per epoch, and released at its end: a process that forks
        # runner workers between epochs holds no LMDB environment (py-lmdb refuses to open a
        # file in a child whose parent had it open) and errors travel through the runner
        try:
            for _, jpeg, label in record_stream(self.settings.order.plan, self.reader, epoch):
                yield [np.frombuffer(jpeg, np.uint8), int(label)]
        except Exception as e:
            if "already open in this process" in str(e):
                _deliver_errors_before_exit()
                raise RuntimeError(
                    f"{self.reader.path} was open in the process that forked this one (an epoch "
                    "of this flow, a Loader or another reader of the file was being iterated "
                    "there), and LMDB cannot open it again in the child: start tensorpack's "
                    "runners before iterating the file in the parent, or call close() on the "
                    "readers first") from e
            raise
        finally:
            self.reader.close()


def _deliver_errors_before_exit() -> None:
    """Let the error this forked runner worker is about to raise reach its parent.

    tensorpack's ``MultiProcessRunnerZMQ`` worker sends the exception to the parent, then
    closes its socket with linger 0, which discards a message not yet on the wire: the parent
    then waits in ``recv`` for ever (about 1 run in 4 here). Only in this process, which is
    failing and about to exit, a socket closed with linger 0 lingers up to 2 s instead.
    """
    try:
        import zmq
    except ImportError:  # not under a ZMQ runner: nothing to deliver
        return
    close = zmq.Socket.close
    if getattr(close, "_imagenet_seq_lingers", False):
        return

    def lingering_close(self, linger=None):
        return close(self, 2000 if linger == 0 else linger)

    lingering_close._imagenet_seq_lingers = True
    zmq.Socket.close = lingering_close


class ImageDecoder:
    """Map function ``[jpeg, label] -> [image, label]``: the Loader's fast decode path.

    ``image`` is ``(size, size, 3)`` uint8 RGB. Train: RandomResizedCrop + flip with crop-only
    DCT-scaled decoding; val: resize the shorter side to ``resize_size`` + centre crop. Picklable:
    pass it to ``MultiProcessMapDataZMQ`` / ``MultiProcessMapData`` / ``MapData``. Randomness:
    a generator per process, seeded from ``seed`` and the process id (tensorpack's habit: each
    worker draws its own augmentations).

    Args:
        mode: ``'train'`` or ``'val'``.
        image_size, resize_size, scale, ratio: as for the Loader.
        transform: any ``imagenet_seq.decode.transforms`` transform (overrides the above).
    """

    def __init__(self, mode: str = "train", image_size: int = 224, resize_size: int = 256,
                 scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), transform: Any = None,
                 seed: Optional[int] = None):
        from imagenet_seq.decode import transforms

        if mode not in SPLITS:
            raise ValueError(f"mode={mode!r}; expected 'train' or 'val'")
        if transform is None:
            from imagenet_seq.integrations import check_image_size

            image_size = check_image_size(image_size)
        if transform is None:
            transform = transforms.TrainTransform(image_size, scale, ratio) if mode == "train" \
                else transforms.ValTransform(image_size, resize_size)
        self.transform = transform
        self.seed = seed
        self._rng, self._pid, self._home = None, None, os.getpid()

    def __call__(self, dp: list) -> list:
        if self._pid != os.getpid():  # first call in this process (a fork, a worker)
            if os.getpid() != self._home:
                # a worker process: one image at a time, processes are the parallelism. torch's
                # OpenMP pool (the resize kernel) hangs in a child forked after the parent used
                # it; one thread never starts it. The creating process keeps its settings.
                import torch

                torch.set_num_threads(1)
            entropy = [os.getpid()] if self.seed is None else [self.seed, os.getpid()]
            self._rng, self._pid = np.random.default_rng(entropy), os.getpid()
        jpeg, label = dp[0], dp[1]
        return [self.transform(jpeg if isinstance(jpeg, bytes) else memoryview(jpeg),
                               self._rng), label]

    def __getstate__(self):
        return dict(self.__dict__, _rng=None, _pid=None)


class DecodeImage(_td.ProxyDataFlow):
    """``[jpeg, label] -> [image, label]`` inline (one process): :class:`ImageDecoder` as a
    DataFlow. For parallel decoding use ``MultiProcessMapDataZMQ(ds, n, ImageDecoder(...))``."""

    def __init__(self, ds, mode: str = "train", **kw):
        super().__init__(ds)
        self.decoder = ImageDecoder(mode, **kw)
        self._pid = None

    def reset_state(self) -> None:
        super().reset_state()
        self._pid = os.getpid()

    def __iter__(self) -> Iterator[list]:
        if self._pid != os.getpid():
            raise AssertionError(_NOT_RESET.format(name=type(self).__name__))
        decode = self.decoder
        for dp in self.ds:
            yield decode(dp)


class LoaderFlow(_Epochs, _td.DataFlow):
    """The ready flow: ``[images, labels]`` batches from :class:`imagenet_seq.data.Loader`.

    ``images``: uint8 numpy ``(N, H, W, 3)`` (``layout='NHWC'``, default) or ``(N, 3, H, W)``;
    ``labels``: int64 ``(N,)``. ``len()`` = batches per epoch (the last one partial unless
    ``drop_last``). Decoding runs in the Loader's workers (threads on the fast path), which start
    with each epoch in the iterating process: wrap it in ``MultiProcessRunnerZMQ(flow, 1)`` to
    move the whole pipeline out of the training process.

    Args:
        root, split: as for the Loader.
        layout: ``'NHWC'`` (tensorpack's BatchData, TensorFlow) or ``'NCHW'`` (PyTorch).
        **loader_kwargs: any :class:`imagenet_seq.data.Loader` argument (``batch_size``,
            ``num_workers``, ``image_size``, ``rank``, ...); ``device``/``decoder='dali'`` are
            refused (this face yields host numpy arrays).
    """

    def __init__(self, root: str, split: str = "train", *, layout: str = "NHWC",
                 **loader_kwargs):
        if layout not in ("NHWC", "NCHW"):
            raise ValueError(f"layout={layout!r}; expected 'NHWC' or 'NCHW'")
        for bad in ("device", "channels_last"):
            if bad in loader_kwargs:
                raise ValueError(f"LoaderFlow takes no {bad}=: it yields host numpy arrays in "
                                 "`layout`; use imagenet_seq.data.Loader for tensors")
        if loader_kwargs.get("decoder", "cpu") != "cpu":
            raise ValueError("LoaderFlow decodes on the CPU (decoder='cpu'); for DALI use "
                             "imagenet_seq.data.Loader(decoder='dali')")
        from imagenet_seq.loader.loader import Loader

        self.layout = layout
        self.loader = Loader(root, split, channels_last=layout == "NHWC", **loader_kwargs)
        self._init_epochs()

    def __len__(self) -> int:
        return len(self.loader)

    def reset_state(self) -> None:
        self._pid = os.getpid()

    def __iter__(self) -> Iterator[list]:
        epoch = self._next_epoch()
        L = self.loader
        L.set_epoch(epoch)
        nhwc = self.layout == "NHWC"
        for images, labels in L:
            if nhwc:
                images = images.permute(0, 2, 3, 1)  # channels_last storage: a view, no copy
            yield [images.numpy(), labels.numpy()]

    def close(self) -> None:
        """Stop the workers of an unfinished epoch."""
        self.loader.close()
