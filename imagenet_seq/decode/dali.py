"""Optional DALI decode stage: raw JPEG bytes of one batch -> images on the rank's device.

With ``decoder='dali'`` the Loader's workers skip decoding and the Loader calls a
:class:`DaliDecoder` on each raw batch in the main process; reader, order, shuffle, exact epochs
and DDP sharding are untouched. One DALI ``Pipeline``, built lazily on the first call:

* train: ``external_source`` -> ``decoders.image_random_crop`` (decodes only the sampled
  RandomResizedCrop box; ``mixed`` = nvJPEG on the GPU, ``cpu`` = libjpeg-turbo) -> ``resize``
  -> ``crop_mirror_normalize`` (flip from a coin flip; ImageNet mean/std for float output).
* val: ``decoders.image`` -> ``resize`` + ``crop_mirror_normalize`` with torchvision's
  ``Resize`` + ``CenterCrop`` geometry, so pixels line up with ``decode.ValTransform``.

EXIF orientation is ignored, as on the CPU path. Failures never kill training: the images DALI
rejects are found (DALI names the sample, else bisection), decoded with
:mod:`imagenet_seq.decode.transforms` on the CPU and spliced back in; the pipeline is rebuilt after every
DALI error (DALI's error says the pipeline object is no longer valid).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext as _nullcontext
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from imagenet_seq.decode.dali_setup import (DEVICE_PADDING, HOST_PADDING, INSTALL_LINE,
                                            failed_sample, import_dali, resolve_device,
                                            short_error)
from imagenet_seq.decode.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from imagenet_seq.format import SPLITS

__all__ = ["DaliDecoder", "INSTALL_LINE"]

log = logging.getLogger(__name__)


class DaliDecoder:
    """Decode a batch of JPEG bytes with NVIDIA DALI into an NCHW tensor on one device.

    Args:
        mode: ``'train'`` (random-resized crop + flip) or ``'val'`` (resize + centre crop).
        batch_size: the largest batch the pipeline is sized for; smaller batches (the last one
            of an epoch) are fed as they are (DALI accepts variable batch sizes up to this).
            Larger inputs are decoded in chunks of ``batch_size``.
        image_size: output side in pixels.
        resize_size: val only: the shorter side before the centre crop.
        scale: train only: range of the crop's area as a fraction of the image.
        ratio: train only: range of the crop's aspect ratio (width / height).
        device: where outputs and targets go. ``None`` = the current CUDA device if CUDA is
            available (the rank's own under DDP, after ``torch.cuda.set_device``), else CPU.
        seed: DALI's pipeline seed, mixed with ``rank`` so ranks draw different crops. Fixed
            seed + rank + inputs = fixed outputs on the CPU backend.
        channels_last: return images in channels-last memory format (shape stays NCHW).
        output: ``'uint8'`` (raw pixels, like the CPU path) or ``'float'`` (float32,
            normalised with ImageNet mean/std).
        num_threads: DALI CPU worker threads.
        backend: ``'gpu'`` (nvJPEG "mixed" decode, GPU resize/crop), ``'cpu'`` (all on the
            CPU, outputs then copied to ``device``) or ``None`` = ``'gpu'`` when ``device`` is a
            CUDA device, else ``'cpu'``.
        rank: mixed into the seed; ``None`` = the ``torch.distributed`` rank when a process
            group is initialised, else 0.
        skip_broken: drop images that neither DALI nor OpenCV can decode (their targets too)
            instead of raising :class:`imagenet_seq.decode.transforms.DecodeError`.

    Call ``decoder(jpegs, labels)`` -> ``(images, targets)``: images ``(N, 3, S, S)`` on
    ``device`` in input order, targets int64 on ``device``. Memory: one DALI pipeline; on the
    GPU backend nvJPEG preallocates per thread 211 MB of device memory and 2 x 140 MB of
    pinned host memory (NVIDIA's ImageNet settings), plus a few batches of outputs.

    Raises:
        ImportError: DALI is not installed (the message has the ``pip install`` line).
        RuntimeError: a CUDA device or ``backend='gpu'`` was requested without CUDA.
        ValueError: an argument is out of range (the message names it).
    """

    _pipeline_options: dict = {}  # extra dali.Pipeline arguments (tests: exec_dynamic=False)

    def __init__(self, mode: str, batch_size: int, image_size: int = 224,
                 resize_size: int = 256, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 device: Union[None, str, torch.device] = None, seed: int = 0,
                 channels_last: bool = False, output: str = "uint8", num_threads: int = 2,
                 backend: Optional[str] = None, skip_broken: bool = False,
                 rank: Optional[int] = None) -> None:
        if mode not in SPLITS:
            raise ValueError(f"mode={mode!r}; expected one of 'train', 'val'")
        for name, value in (("batch_size", batch_size), ("image_size", image_size),
                            ("resize_size", resize_size), ("num_threads", num_threads)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r}; expected a positive int")
        if mode == "val" and image_size > resize_size:
            raise ValueError(f"image_size={image_size} > resize_size={resize_size}; the centre "
                             "crop must fit inside the resized image (e.g. 224 and 256)")
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale={scale!r}; expected 0 < low <= high <= 1, e.g. (0.08, 1.0)")
        rlo, rhi = (float(v) for v in ratio)
        if not 0 < rlo <= rhi:
            raise ValueError(f"ratio={ratio!r}; expected 0 < low <= high, e.g. (3/4, 4/3)")
        if output not in ("uint8", "float"):
            raise ValueError(f"output={output!r}; expected 'uint8' or 'float'")
        if backend not in (None, "cpu", "gpu"):
            raise ValueError(f"backend={backend!r}; expected None, 'cpu' or 'gpu'")
        import_dali()  # fail now, with the install line, not on the first batch
        if backend == "gpu" and device is None and not torch.cuda.is_available():
            raise RuntimeError("backend='gpu' was requested but CUDA is not available here; "
                               "use backend='cpu' (or None) to run DALI's CPU backend")
        self.device = resolve_device(device)
        self.backend = backend or ("gpu" if self.device.type == "cuda" else "cpu")
        if self.backend == "gpu" and self.device.type != "cuda":
            raise ValueError(f"backend='gpu' with device={device!r}; the GPU backend writes to "
                             "a CUDA device: pass device='cuda:N' or backend='cpu'")
        self.mode = mode
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.scale = (lo, hi)
        self.ratio = (rlo, rhi)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.output = output
        self.num_threads = int(num_threads)
        self.skip_broken = bool(skip_broken)
        self.rank = rank
        self.num_fallbacks = 0  # images decoded on the CPU because DALI failed on them
        self.last_skipped: List[int] = []  # skip_broken: positions left out by the last call
        self.skip_reason = "neither DALI nor OpenCV could decode it"
        self._pipe: Any = None
        self._cpu_transform: Any = None

    def __repr__(self) -> str:
        return (f"DaliDecoder(mode={self.mode!r}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, output={self.output!r})")

    def __getstate__(self) -> dict:
        # a DALI pipeline (threads, CUDA buffers) never crosses a process boundary
        state = self.__dict__.copy()
        state["_pipe"] = None
        return state

    # -- the pipeline --------------------------------------------------------------------------

    def _pipeline_seed(self) -> int:
        rank = self.rank
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return int(np.random.SeedSequence([self.seed, rank]).generate_state(1)[0] & 0x7FFFFFFF)

    def _build(self) -> Any:
        dali, fn, types = import_dali()
        gpu = self.backend == "gpu"
        decode_device = "mixed" if gpu else "cpu"
        # prefetch_queue_depth=1: each call feeds exactly one batch and runs it
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=self.device.index if gpu else None,
                             seed=self._pipeline_seed(), prefetch_queue_depth=1,
                             **self._pipeline_options)
        padding = dict(device_memory_padding=DEVICE_PADDING,
                       host_memory_padding=HOST_PADDING) if gpu else {}
        with pipe:
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            if self.mode == "train":
                images = fn.decoders.image_random_crop(
                    jpegs, device=decode_device, output_type=types.RGB,
                    random_area=list(self.scale), random_aspect_ratio=list(self.ratio),
                    num_attempts=10, adjust_orientation=False, **padding)
                images = fn.resize(images, resize_x=self.image_size, resize_y=self.image_size,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
                crop_pos = dict(crop_pos_x=0.5, crop_pos_y=0.5)  # no-op: already image_size
            else:
                # val on the GPU: libjpeg-turbo's chroma upsampling, so the evaluated pixels
                # match the CPU backend's and the OpenCV path's more closely
                exact = dict(jpeg_fancy_upsampling=True) if gpu else {}
                images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB,
                                           adjust_orientation=False, **padding, **exact)
                new_w, new_h, pos_x, pos_y = self._val_geometry(fn, types, dali.math, jpegs)
                images = fn.resize(images, resize_x=new_w, resize_y=new_h,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                crop_pos = dict(crop_pos_x=pos_x, crop_pos_y=pos_y)
                mirror = 0
            if self.output == "float":
                norm = dict(dtype=types.FLOAT, mean=[255 * m for m in IMAGENET_MEAN],
                            std=[255 * s for s in IMAGENET_STD])
            else:  # no normalisation: mean 0, std 1 keeps the pixel values exactly
                norm = dict(dtype=types.UINT8)
            images = fn.crop_mirror_normalize(
                images, crop=(self.image_size, self.image_size), mirror=mirror,
                output_layout="HWC" if self.channels_last else "CHW", **crop_pos, **norm)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _val_geometry(self, fn: Any, types: Any, dmath: Any, jpegs: Any) -> Tuple[Any, ...]:
        """torchvision's Resize(resize) + CenterCrop(size) geometry, as DALI graph nodes.

        Computed from the JPEG header (CPU, no decode), so the GPU backend gets it too:
        the short side becomes ``resize``, the long one ``int(resize * long / short)``, and the
        crop offset is Python's ``round((side - size) / 2)`` (half to even). DALI's own
        ``resize_shorter`` + centre crop round differently and land one pixel off.
        """
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False, dtype=types.FLOAT)
        h, w = shape[0], shape[1]
        short = dmath.min(h, w)
        new_h = dmath.floor(h * self.resize_size / short)
        new_w = dmath.floor(w * self.resize_size / short)

        def centre(side: Any) -> Any:
            d = side - self.image_size
            half = dmath.floor(d / 2)
            odd_d = d - 2 * half
            odd_half = half - 2 * dmath.floor(half / 2)
            left = half + odd_d * odd_half  # x.5 rounds to the even neighbour
            # as a fraction of the free space; +0.25 px so DALI's float rounding (or floor)
            # lands on `left`, and max(d, 1) avoids 0/0 when there is no free space
            return (left + 0.25) / dmath.max(d, 1)

        return new_w, new_h, centre(new_w), centre(new_h)

    def set_image_size(self, size: int) -> None:
        """Output side of the next calls (val keeps its resize/crop ratio); the pipeline is
        rebuilt once, on the next call, when the size changes."""
        size = int(size)
        if size != self.image_size:
            if self.mode == "val":
                self.resize_size = max(size, int(round(self.resize_size * size /
                                                       self.image_size)))
            self.image_size = size
            self._cpu_transform = None
            self._drop_pipeline()

    def _drop_pipeline(self) -> None:
        self._pipe = None  # DALI marks a pipeline invalid after an error: build a fresh one

    def _run(self, arrays: List[np.ndarray]) -> torch.Tensor:
        """One DALI run over ``arrays`` (<= batch_size) -> logical NCHW tensor on the device."""
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("jpegs", arrays)
        (out,) = self._pipe.run()
        tensor = out.as_tensor()
        gpu = self.backend == "gpu"
        if getattr(self._pipe, "exec_dynamic", False):
            # DALI's dynamic executor (the default since DALI 2.0) keeps an output alive while
            # a DLPack consumer holds it, and hands it over on torch's current stream: no copy,
            # as in DALI's own PyTorch iterator
            with torch.cuda.device(self.device) if gpu else _nullcontext():
                dest = torch.from_dlpack(tensor)
        else:
            # older executors reuse the output buffer on the next run: copy it out, finished
            # before we return (torch's stream, so the fresh block is not still in use there)
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dtype = torch.float32 if self.output == "float" else torch.uint8
            dest = torch.empty(tensor.shape(), dtype=dtype,
                               device=self.device if gpu else torch.device("cpu"))
            stream = torch.cuda.current_stream(self.device) if gpu else None
            feed_ndarray(tensor, dest, cuda_stream=stream)
            if stream is not None:
                stream.synchronize()
        if not gpu and self.device.type == "cuda":
            dest = dest.to(self.device)
        return dest.permute(0, 3, 1, 2) if self.channels_last else dest

    # -- the call ------------------------------------------------------------------------------

    def __call__(self, jpegs: Sequence[Any], labels: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode ``jpegs`` (bytes-like, one per image) with their ``labels``.

        Returns:
            ``(images, targets)`` in input order: images ``(N, 3, S, S)`` uint8 or float32 on
            ``self.device`` (channels-last memory when asked), targets int64 ``(N,)``. With
            ``skip_broken``, undecodable images and their targets are left out and their
            positions listed in ``self.last_skipped``.

        Raises:
            ValueError: ``len(labels) != len(jpegs)``.
            imagenet_seq.decode.transforms.DecodeError: an image neither DALI nor OpenCV can decode
                (unless ``skip_broken``); the message gives its position in the batch.
        """
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if len(targets) != len(jpegs):
            raise ValueError(f"{len(jpegs)} images but {len(targets)} labels; expected one "
                             "label per image")
        arrays = [np.frombuffer(j, dtype=np.uint8) if not isinstance(j, np.ndarray)
                  else j.reshape(-1).view(np.uint8) for j in jpegs]
        pieces, keep = [], []
        for start in range(0, len(arrays), self.batch_size):
            images, kept = self._decode_chunk(arrays[start:start + self.batch_size])
            pieces.append(images)
            keep.extend(start + k for k in kept)
        if not pieces:
            dtype = torch.float32 if self.output == "float" else torch.uint8
            pieces = [torch.empty((0, 3, self.image_size, self.image_size), dtype=dtype,
                                  device=self.device)]
        images = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        kept = set(keep)
        self.last_skipped = [i for i in range(len(targets)) if i not in kept]
        if self.last_skipped:
            targets = targets[torch.as_tensor(keep, dtype=torch.int64)]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device)

    def _decode_chunk(self, arrays: List[np.ndarray]) -> Tuple[torch.Tensor, List[int]]:
        """Decode <= batch_size images; returns (images, kept positions)."""
        try:
            return self._run(arrays), list(range(len(arrays)))
        except RuntimeError as err:
            self._drop_pipeline()
            return self._decode_with_fallback(arrays, err)

    def _decode_with_fallback(self, arrays: List[np.ndarray],
                              first_err: RuntimeError) -> Tuple[torch.Tensor, List[int]]:
        """Find the images DALI rejects, decode those on the CPU, splice everything in order."""
        n = len(arrays)
        done: List[Tuple[List[int], torch.Tensor]] = []
        bad: List[int] = []
        errors = {}
        work: List[Tuple[List[int], Optional[RuntimeError]]] = [(list(range(n)), first_err)]
        while work:
            idx, err = work.pop()
            if err is None:
                try:
                    done.append((idx, self._run([arrays[i] for i in idx])))
                    continue
                except RuntimeError as e:
                    self._drop_pipeline()
                    err = e
            if len(idx) == 1:
                bad.append(idx[0])
                errors[idx[0]] = err
                continue
            k = failed_sample(err)
            if k is not None and k < len(idx):
                # DALI named the sample: a wrong guess only costs one CPU decode, still correct
                bad.append(idx[k])
                errors[idx[k]] = err
                rest = idx[:k] + idx[k + 1:]
                work.append((rest, None))
            else:
                half = len(idx) // 2
                work.extend([(idx[:half], None), (idx[half:], None)])
        if len(bad) == n:
            self._check_healthy(first_err)
        log.warning("DALI could not decode %d of %d images of this batch (%s); decoding them "
                    "on the CPU with OpenCV", len(bad), n, short_error(errors[bad[0]]))
        from imagenet_seq.decode.transforms import DecodeError

        fixed, broken = {}, []
        for i in sorted(bad):
            try:
                fixed[i] = self._cpu_decode(arrays[i])
            except Exception as e:  # noqa: BLE001 - DecodeError, or cv2.error on odd input
                if not self.skip_broken:
                    raise DecodeError(f"image {i} of this batch ({arrays[i].size} bytes) cannot "
                                      f"be decoded: DALI said {short_error(errors[i])!r}; OpenCV "
                                      f"said {e}") from None
                log.warning("skipping image %d of this batch: %s", i, e)
                broken.append(i)
        self.num_fallbacks += len(fixed)
        keep = [i for i in range(n) if i not in broken]
        dtype = torch.float32 if self.output == "float" else torch.uint8
        out = torch.empty((len(keep), 3, self.image_size, self.image_size), dtype=dtype,
                          device=self.device,
                          memory_format=torch.channels_last if self.channels_last
                          else torch.contiguous_format)
        where = {i: p for p, i in enumerate(keep)}
        for idx, images in done:
            out[torch.as_tensor([where[i] for i in idx], device=self.device)] = images
        for i, img in fixed.items():
            out[where[i]] = img[0]
        return out, keep

    def _check_healthy(self, err: RuntimeError) -> None:
        """Raise if DALI fails on a known-good JPEG too: then the problem is not the images
        (e.g. CUDA out of memory), and CPU-decoding every batch from now on would hide it."""
        import cv2

        probe = np.zeros((32, 32, 3), np.uint8)
        probe[:, :16] = 200
        ok, jpeg = cv2.imencode(".jpg", probe)
        try:
            self._run([np.frombuffer(jpeg.tobytes(), np.uint8)])
        except RuntimeError as probe_err:
            self._drop_pipeline()
            raise RuntimeError(f"DALI fails even on a known-good JPEG, so the problem is not the "
                               f"images: {short_error(probe_err)}") from err

    def _cpu_decode(self, data: np.ndarray) -> torch.Tensor:
        """One image through the CPU path's transform -> (1, 3, S, S) like DALI's output."""
        from imagenet_seq.decode.transforms import TrainTransform, ValTransform

        if self._cpu_transform is None:
            self._cpu_transform = (
                TrainTransform(self.image_size, self.scale, self.ratio) if self.mode == "train"
                else ValTransform(self.image_size, self.resize_size))
        rng = np.random.default_rng([self.seed, self.num_fallbacks, data.size])
        hwc = self._cpu_transform(data.tobytes(), rng)
        img = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).unsqueeze(0)
        if self.output == "float":
            img = normalize(img)
        return img.to(self.device)
