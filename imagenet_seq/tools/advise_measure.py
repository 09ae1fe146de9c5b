"""What ``imagenet-seq-bench --advise`` measures before it predicts (the measure role).

* the disk under the split: its sequential rate (the bench's raw stream, from a dropped page
  cache), the cost of a far move (small reads at far apart offsets, read-ahead off), and the
  rate of reading records in the order of a train epoch's plan (its chunks in their permuted
  order, as the Loader's reader reads them: chunk switches, the drive's reordering of queued
  read-ahead and all);
* a sample of records (:data:`SAMPLE_RECORDS`, read in :data:`SAMPLE_SPANS` spans spread over
  the file, so a class-sorted val split is sampled too): bytes and pixels per image;
* the CPU on that sample: one worker's decode rate with the crop decode on and off, and the
  rate of ``workers`` threads and ``workers`` processes decoding batches as the Loader does;
* the sample re-encoded as the converter would (``--max-size`` N, ``--quality`` 90, by
  :func:`imagenet_seq.convert.images.normalise`): bytes, conversion CPU and decode rate;
* with ``--source``: the source folder's read rate in on-disk (inode) order, page cache
  dropped per file, and its image count.

Every figure is a dict with what it rests on (images, seconds); nothing here predicts.
"""
from __future__ import annotations

import os
import random
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np

from imagenet_seq.tools.bench_measure import BenchError

__all__ = ["SAMPLE_RECORDS", "SAMPLE_SPANS", "SIZES", "QUALITY", "FAR_PROBES", "read_sample",
           "measure_far_move", "measure_plan_read", "measure_cpu", "measure_sizes",
           "measure_source"]

SAMPLE_RECORDS = 192  # decoded and re-encoded; ~20 MB of ImageNet
SAMPLE_SPANS = 8  # contiguous runs the sample is read in, spread over the file
SIZES = (500, 400, 320)  # --max-size candidates
QUALITY = 90  # their --quality
FAR_PROBES = 24  # small reads at far apart offsets
BATCH = 32  # images per decode task (a Loader worker decodes batches)
CPU_SECONDS = 1.5  # each CPU figure decodes the sample for at least this long


def read_sample(reader, n: int = SAMPLE_RECORDS) -> List[bytes]:
    """Up to ``n`` records' JPEG bytes, in :data:`SAMPLE_SPANS` runs spread over the split."""
    total = len(reader)
    n = min(n, total)
    spans = min(SAMPLE_SPANS, n)
    out: List[bytes] = []
    for k in range(spans):
        count = n // spans + (1 if k < n % spans else 0)
        start = min(total - count, k * total // spans)
        out.extend(bytes(j) for _, j, _ in reader.read_range(start, count))
    return out


def measure_far_move(path: str, mb_per_s: float, probes: int = FAR_PROBES,
                     seed: int = 0) -> Dict:
    """Seconds a read costs beyond its transfer when it lands far from the last one.

    ``probes`` 4 KiB reads, each at least a third of the file away from the one before, the
    file's read-ahead off and its page cache dropped; the median time minus the transfer of
    4 KiB at ``mb_per_s``. On a file under 3 MiB the moves are not far (said in ``note``).
    """
    from imagenet_seq.read.evict import evict

    size = os.path.getsize(path)
    block = 4096
    rng = random.Random(seed)
    evict(path)
    offsets, last = [], None
    while len(offsets) < probes and size > block:
        off = rng.randrange(0, size - block) // block * block
        if last is None or abs(off - last) >= size // 3:
            offsets.append(off)
            last = off
    fd = os.open(path, os.O_RDONLY)
    times = []
    try:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (OSError, AttributeError):
            pass
        for off in offsets:
            t0 = time.monotonic()
            os.pread(fd, block, off)
            times.append(time.monotonic() - t0)
    finally:
        os.close(fd)
    med = statistics.median(times) if times else 0.0
    transfer = block / (mb_per_s * 1e6) if mb_per_s > 0 else 0.0
    note = (f"{len(times)} reads of 4 KiB, each >= {size // 3 / 1e6:.1f} MB from the last, "
            "read-ahead off, page cache dropped; median")
    if size < 3 << 20:
        note += " (the file is under 3 MiB: these moves are short, a larger split's cost more)"
    return {"far_move_ms": max(0.0, med - transfer) * 1e3, "probes": len(times),
            "median_read_ms": med * 1e3, "note": note}


def measure_plan_read(reader, split: str, mean_bytes: float, seconds: float,
                      world_size: int = 1) -> Dict:
    """Raw records read in epoch 0's plan order (the Loader's defaults: automatic chunk,
    ``world_size`` ranks' union) from a dropped page cache, for ``seconds`` or the epoch."""
    from imagenet_seq.loader.config import resolve_order
    from imagenet_seq.read.evict import evict

    plan = resolve_order(len(reader), split, mean_bytes, batch_size=1, drop_last=False,
                         shuffle=None, seed=0, rank=0, world_size=1, local_world_size=1,
                         chunk_size=None, buffer_size=None, buffer_bytes=None).plan
    spans = plan.spans(0)
    evicted, note = evict(reader.paths)
    images, nbytes, t0 = 0, 0, time.monotonic()
    whole = True
    for _, jpeg, _ in reader.read_spans(spans):
        images += 1
        nbytes += len(jpeg)
        if images % 32 == 0 and time.monotonic() - t0 >= seconds:
            whole = images >= len(reader)
            break
    dt = time.monotonic() - t0
    return {"mb_per_s": nbytes / dt / 1e6 if dt > 0 else 0.0, "images": images,
            "bytes": nbytes, "seconds": dt, "spans": len(spans), "whole_epoch": whole,
            "page_cache_evicted": evicted, "note": note}


def _transform(split: str, crop_decode: bool = True):
    from imagenet_seq.decode.transforms import TrainTransform, ValTransform

    if split == "train":
        return TrainTransform(224, crop_decode=crop_decode)
    return ValTransform(224, 256)


def _decode_loop(jpegs: Sequence[bytes], transform, seconds: float) -> Dict:
    """One worker, this thread: decode the sample (again) until ``seconds`` have passed; also
    per second of this thread's CPU (what the worker does with a core of its own: a busy
    machine lowers the wall rate, not this one)."""
    rng = np.random.default_rng(0)
    out = np.empty((224, 224, 3), np.uint8)
    n, t0, c0 = 0, time.monotonic(), time.thread_time()
    while True:
        for j in jpegs:
            transform.write(j, rng, out)
        n += len(jpegs)
        if time.monotonic() - t0 >= seconds:
            break
    dt, cpu = time.monotonic() - t0, max(1e-9, time.thread_time() - c0)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "images_per_cpu_s": n / cpu}


_POOL_SAMPLE: List[bytes] = []
_POOL_TRANSFORM = None


def _pool_init(jpegs, transform) -> None:
    global _POOL_SAMPLE, _POOL_TRANSFORM
    _POOL_SAMPLE, _POOL_TRANSFORM = list(jpegs), transform


def _decode_batch(idx: Sequence[int]) -> int:
    """A worker's task: decode these sample images into one batch array."""
    rng = np.random.default_rng(idx[0])
    out = np.empty((len(idx), 224, 224, 3), np.uint8)
    for k, i in enumerate(idx):
        _POOL_TRANSFORM.write(_POOL_SAMPLE[i], rng, out[k])
    return len(idx)


def _pool_rate(jpegs: Sequence[bytes], transform, workers: int, kind: str,
               seconds: float) -> Dict:
    """``workers`` threads or processes decoding batches of the sample for ``seconds``."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    n = len(jpegs)
    tasks = [[(s + k) % n for k in range(BATCH)] for s in range(0, n, BATCH)]
    if kind == "thread":
        _pool_init(jpegs, transform)
        pool = ThreadPoolExecutor(workers)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp.get_context("fork"), initializer=_pool_init,
                                   initargs=(list(jpegs), transform))
    rss = 0.0
    try:
        list(pool.map(_decode_batch, tasks[:workers]))  # workers started (not timed)
        if kind == "process":
            rss = _children_rss_mb()
        # a process worker's batch reaches the trainer as a copy out of the Loader's shared
        # ring, made by the parent: one copy per batch here too (threads write in place)
        ring = np.empty((BATCH, 224, 224, 3), np.uint8) if kind == "process" else None
        images, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            for n in pool.map(_decode_batch, tasks):
                images += n
                if ring is not None:
                    ring.copy()
        dt = time.monotonic() - t0
    finally:
        pool.shutdown(wait=True)
    return {"workers": workers, "kind": kind, "images": images, "seconds": dt,
            "images_per_s": images / dt, "worker_rss_mb": rss}


def _children_rss_mb() -> float:
    """Mean resident memory (MB) of this process's child processes (Linux /proc)."""
    me, sizes = os.getpid(), []
    try:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != me:
                        continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            sizes.append(int(line.split()[1]) / 1e3)
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return 0.0
    return sum(sizes) / len(sizes) if sizes else 0.0


def measure_cpu(jpegs: Sequence[bytes], split: str, workers: int,
                seconds: float = CPU_SECONDS) -> Dict:
    """One worker's decode rate (crop decode on / off) and ``workers`` threads / processes."""
    from imagenet_seq.decode.transforms import _jpegcrop

    out = {"one_worker": _decode_loop(jpegs, _transform(split), seconds),
           "crop_decode_built": _jpegcrop is not None}
    if split == "train":
        out["one_worker_no_crop_decode"] = _decode_loop(jpegs, _transform(split, False),
                                                        seconds)
    w = max(1, workers)
    out["threads"] = _pool_rate(jpegs, _transform(split), w, "thread", seconds)
    out["processes"] = _pool_rate(jpegs, _transform(split), w, "process", seconds)
    try:
        out["cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        out["cpus"] = os.cpu_count() or 1
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


DECODE_ROUNDS = 4  # interleaved rounds of the re-encoded sizes' decode rates


def _dims(jpegs: Sequence[bytes]) -> List[tuple]:
    from imagenet_seq.format.jpeg import jpeg_size

    return [jpeg_size(j) or (0, 0) for j in jpegs]


def measure_sizes(jpegs: Sequence[bytes], split: str, sizes: Sequence[int] = SIZES,
                  quality: int = QUALITY, seconds: float = CPU_SECONDS / 2) -> Dict:
    """The sample's bytes/pixels, and per candidate ``--max-size``: the sample re-encoded as
    the converter does (longer side above N resized, quality ``quality``; others kept byte for
    byte): bytes relative to as is, share re-encoded, conversion CPU, one worker's decode rate.
    ``as_is`` holds the converter's per-image CPU for an image it only validates."""
    from imagenet_seq.convert.images import normalise

    dims = _dims(jpegs)
    nbytes = np.array([len(j) for j in jpegs], float)
    side = np.array([max(d) for d in dims], float)
    out = {"images": len(jpegs),
           "bytes": {"mean": float(nbytes.mean()), "p10": float(np.percentile(nbytes, 10)),
                     "p50": float(np.median(nbytes)), "p90": float(np.percentile(nbytes, 90))},
           "pixels_mean": float(np.mean([w * h for w, h in dims])),
           "longer_side": {"p10": float(np.percentile(side, 10)),
                           "p50": float(np.median(side)), "p90": float(np.percentile(side, 90))}}
    t0 = time.process_time()
    for j in jpegs:
        normalise(j, None)
    out["as_is"] = {"convert_cpu_ms": (time.process_time() - t0) / len(jpegs) * 1e3}
    sets = {"as_is": jpegs}
    for n in sizes:
        t0 = time.process_time()
        sets[str(n)] = [normalise(j, n, quality)[0] for j in jpegs]
        cpu = (time.process_time() - t0) / len(jpegs)
        out[str(n)] = {"max_size": n, "quality": quality,
                       "bytes_ratio": sum(map(len, sets[str(n)])) / nbytes.sum(),
                       "reencoded_share": float(np.mean(side > n)),
                       "convert_cpu_ms": cpu * 1e3}
    # decode rates in interleaved rounds (as is, each size, again...), each ratio to as is
    # from CPU seconds of the same round: a load that comes and goes moves them together
    rounds = {k: [] for k in sets}
    for _ in range(DECODE_ROUNDS):
        for k, js in sets.items():
            rounds[k].append(_decode_loop(js, _transform(split), seconds / DECODE_ROUNDS))
    one = float(np.median([r["images_per_s"] for r in rounds["as_is"]]))
    out["as_is"]["one_worker_images_per_s"] = one
    for n in sizes:
        k = str(n)
        ratio = float(np.median([b["images_per_cpu_s"] / a["images_per_cpu_s"]
                                 for a, b in zip(rounds["as_is"], rounds[k])]))
        out[k]["decode_ratio"] = ratio
        out[k]["one_worker_images_per_s"] = one * ratio
    return out


def measure_source(folder: str, seconds: float) -> Dict:
    """The source images' read rate in on-disk (inode) order, one reader, each file's page
    cache dropped first; the number of images and their mean size from the files read.

    Raises:
        BenchError: ``folder`` is missing or holds no images.
    """
    from imagenet_seq.convert.images import IMAGE_EXTENSIONS

    if not os.path.isdir(folder):
        raise BenchError(f"--source {folder!r} is not a folder; pass the ImageNet folder the "
                         "split was (or will be) converted from, e.g. /data/imagenet")
    found = []  # (inode, path): names and inodes from the directory, no stat per file
    for d, _, _ in os.walk(folder):
        with os.scandir(d) as it:
            found.extend((e.inode(), e.path) for e in it
                         if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    if not found:
        raise BenchError(f"--source {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)});"
                         " pass the ImageNet folder (train/<class>/*.JPEG ...)")
    found.sort()
    # start at a random place in the order: the first files may be cached by the walk
    start = random.Random(0).randrange(len(found)) if len(found) > 64 else 0
    files, nbytes, t0 = 0, 0, time.monotonic()
    for _, path in found[start:] + found[:start]:
        with open(path, "rb", buffering=0) as f:
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                pass
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                nbytes += len(b)
        files += 1
        if time.monotonic() - t0 >= seconds:
            break
    dt = time.monotonic() - t0
    return {"folder": folder, "images": len(found), "files_read": files, "bytes_read": nbytes,
            "seconds": dt, "mb_per_s": nbytes / dt / 1e6, "files_per_s": files / dt,
            "mean_file_kb": nbytes / files / 1e3,
            "total_gb": len(found) * nbytes / files / 1e9,
            "method": "inode order (the converter's order where FIEMAP is not available), "
                      "page cache of each file dropped before its read"}
