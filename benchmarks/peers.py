"""The peers of benchmarks/throughput.py: one function per pipeline, run in its own process.

Each ``run_<peer>(data, warmup, measure)`` builds its pipeline on the benchmark files
(benchmarks/data.py), skips ``warmup`` batches, times ``measure`` batches and returns
``{"images", "seconds", "rate", "cpu_us"}``; ``cpu_us`` is CPU time per image summed over every
process of the peer. ``run_memory_<type>`` records the Loader's memory per epoch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Dict, List, Sequence

import data as bench_data  # benchmarks/data.py (benchmarks/ is on sys.path)

BATCH = 64
WORKERS = 2
SIZE = 224
TV_PYTHON = "/opt/tv-venv/bin/python"
PEERS = ("decode", "tensorpack", "dali", "torchvision", "ours_process", "ours_thread",
         "ours_opencv")
TARGETS = {"tensorpack": 1.5, "dali": 1.5, "torchvision": 2.5, "decode_limit": 0.80}


def run_result_child(cmd: Sequence[str], cwd: str, timeout: float) -> Dict:
    """Run one measurement child (its own session, with ``cwd`` on its PYTHONPATH) and return
    the JSON of its ``RESULT `` line, or ``{"error": ...}`` naming the exit status and the last
    lines of its stderr. The child's whole process group (its workers) is killed at the end."""
    env = dict(os.environ, PYTHONPATH=cwd + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=cwd, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {timeout:.0f} s"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the peer's workers too
        except ProcessLookupError:
            pass
        p.wait()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = " | ".join((err or "").strip().splitlines()[-3:])
    return {"error": f"exit {p.returncode}: {tail}"}


# --- peers (each runs in a child process: ``--peer NAME``) ----------------------------------

def tree_cpu() -> float:
    """CPU seconds (user + sys) used by this process and its descendants, reaped ones included."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _timed(batches, warmup: int, measure: int) -> Dict[str, float]:
    """Skip ``warmup`` batches of an endless batch iterator, then time ``measure`` batches.

    Returns wall-clock images/s and CPU microseconds per image over all the peer's processes
    (contention-robust: on a shared machine a peer with more processes gets more CPU share).
    """
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n = 0
    c0, t0 = tree_cpu(), time.perf_counter()
    for _ in range(measure):
        n += next(it)
    dt = time.perf_counter() - t0
    cpu = tree_cpu() - c0
    return {"images": n, "seconds": dt, "rate": n / dt, "cpu_us": cpu / n * 1e6}


def run_decode(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    import cv2
    import numpy as np

    # the best single-core rate: the decode limit must not be inflated by glibc's mmap/munmap
    # of every output (imagenet_seq.malloc)
    from imagenet_seq.malloc import keep_decode_buffers

    keep_decode_buffers()
    cv2.setNumThreads(1)
    blobs = []
    for path, _ in bench_data.train_files(d.folder):
        with open(path, "rb") as f:
            blobs.append(np.frombuffer(f.read(), np.uint8))
    for b in blobs[:warmup]:
        cv2.imdecode(b, cv2.IMREAD_COLOR)
    n = 0
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(max(1, measure * BATCH // len(blobs))):
        for b in blobs:
            cv2.imdecode(b, cv2.IMREAD_COLOR)
        n += len(blobs)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "rate": n / dt,
            "cpu_us": (time.thread_time() - c0) / n * 1e6}


def run_tensorpack(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    if d.legacy is None:
        raise ImportError("no legacy LMDB (tensorpack missing when the data was built)")
    import cv2
    from tensorpack.dataflow import (BatchData, LMDBSerializer, LocallyShuffleData,
                                     MultiProcessMapDataZMQ, MultiProcessRunnerZMQ, imgaug)

    augs = imgaug.AugmentorList([imgaug.GoogleNetRandomCropAndResize(target_shape=SIZE),
                                 imgaug.Flip(horiz=True)])

    def f(dp):
        img = cv2.imdecode(dp[0], cv2.IMREAD_COLOR)
        return [augs.augment(img), dp[1]]

    ds = LMDBSerializer.load(d.legacy, shuffle=False)
    # the recipe uses a 50,000-record buffer for 1.28 M images; keep the same ~4 % here
    ds = LocallyShuffleData(ds, max(BATCH, d.images // 25))
    ds = MultiProcessRunnerZMQ(ds, 1)
    ds = MultiProcessMapDataZMQ(ds, WORKERS, f, buffer_size=4 * BATCH, strict=False)
    ds = BatchData(ds, BATCH, use_list=False)
    ds.reset_state()
    return _timed((len(b[1]) for b in ds), warmup, measure)


def run_dali(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=WORKERS, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=d.train_dir, random_shuffle=True,
                                        initial_fill=max(BATCH, d.images // 25), name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        images = fn.resize(images, resize_x=SIZE, resize_y=SIZE)
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        return images, labels

    p = pipe()
    p.build()

    def batches():
        while True:
            images, labels = p.run()
            images.as_array()  # materialise the batch as one ndarray, as a trainer would
            yield len(labels)

    return _timed(batches(), warmup, measure)


def run_torchvision(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(d.train_dir, tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS)

    def batches():
        while True:
            for images, _ in dl:
                yield len(images)

    return _timed(batches(), warmup, measure)


def _ours(d: bench_data.BenchData, worker_type: str, **kw):
    from imagenet_seq.data import Loader

    # the same ~4 % shuffle buffer as tensorpack's and DALI's (ImageNet default: ~1.5 %)
    return Loader(d.lmdb, "train", batch_size=BATCH, num_workers=WORKERS, shuffle=True,
                  worker_type=worker_type, buffer_size=max(BATCH, d.images // 25), **kw)


def _epochs(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images, _ in loader:
            yield len(images)
        epoch += 1


def run_ours_process(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    return _timed(_epochs(_ours(d, "process")), warmup, measure)


def run_ours_thread(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    return _timed(_epochs(_ours(d, "thread")), warmup, measure)


def run_ours_opencv(d: bench_data.BenchData, warmup: int, measure: int) -> Dict[str, float]:
    """Threads with OpenCV's non-antialiased filter (antialias=False, the default before issue
    11): what torchvision's pixels cost, measured in the same run."""
    from imagenet_seq.decode.transforms import TrainTransform

    return _timed(_epochs(_ours(d, "thread", transform=TrainTransform(antialias=False))),
                  warmup, measure)


def _own_mib(pid: int) -> float:
    """A process's share of anonymous and shared-memory pages (``Pss_Anon + Pss_Shmem``, MiB):
    its heap, buffers and shared rings, without file pages it has mapped (the LMDB map: page
    cache, counted in RSS/PSS as the reader touches it) or shared libraries."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return float("nan")
    return total


def tree_memory() -> Dict[str, float]:
    """RSS and PSS (MiB) of this process ("main_") and summed over it and its descendants."""
    import psutil

    me = psutil.Process()
    out = {"rss_mib": 0.0, "pss_mib": 0.0, "own_mib": 0.0}
    for p in [me] + me.children(recursive=True):
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = info.rss / 2 ** 20, getattr(info, "pss", info.rss) / 2 ** 20
        out["rss_mib"] += rss
        out["pss_mib"] += pss
        out["own_mib"] += _own_mib(p.pid)
        if p.pid == me.pid:
            out["main_rss_mib"], out["main_pss_mib"] = rss, pss
    return out


def _memory(d: bench_data.BenchData, worker_type: str) -> List[Dict[str, float]]:
    """Loader memory at the end of each of 5 epochs (whole process tree, workers alive)."""
    loader = _ours(d, worker_type)
    series = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(len(loader) - 1):
            next(it)
        series.append(tree_memory())  # before the last batch: the workers are still alive
        for _ in it:
            pass
    return series


def run_memory_thread(d: bench_data.BenchData, warmup: int, measure: int) -> Dict:
    return {"series": _memory(d, "thread")}


def run_memory_process(d: bench_data.BenchData, warmup: int, measure: int) -> Dict:
    return {"series": _memory(d, "process")}


RUNNERS = {"decode": run_decode, "tensorpack": run_tensorpack, "dali": run_dali,
           "torchvision": run_torchvision, "ours_process": run_ours_process,
           "ours_thread": run_ours_thread, "ours_opencv": run_ours_opencv,
           "memory_thread": run_memory_thread,
           "memory_process": run_memory_process}
IMPORTS = {"tensorpack": "tensorpack.dataflow", "dali": "nvidia.dali", "torchvision": "torchvision",
           "ours_process": "imagenet_seq.data", "ours_thread": "imagenet_seq.data",
           "ours_opencv": "imagenet_seq.data",
           "memory_thread": "imagenet_seq.data", "memory_process": "imagenet_seq.data"}
