"""``imagenet-seq-bench``: how many hours N epochs will take on *this* storage.

Measures, each with the files' page cache dropped first (so the disk is measured, not RAM):

* ``stream``: raw record streaming, one cursor walking the LMDB (the disk's sequential rate);
  a file read in less than ``--seconds`` is read again, its cache dropped before each pass;
* ``pipeline``: the full :class:`imagenet_seq.data.Loader` (read, shuffle, decode, augment,
  batch), its shuffle-buffer fill counted: whole epochs when one fits in ``--seconds`` (a
  split that fits the buffer is read whole before its first batch), else the steady window
  while records still come from the device, the fill added to each epoch
  (:func:`measure_pipeline`);
* ``folder`` (``--folder``): random-order reads of the raw ImageFolder's files;
* ``--ranks N``: N rank processes of one machine reading raw records with per-rank readers,
  then with the node reader (:mod:`.bench_ranks`), each from a dropped page cache: which is
  faster on this disk, by how much (ranks x slowest rank), and how to turn the node reader
  off (``IMAGENET_SEQ_NODE_READER=0``). The pipeline is not measured then (one rank's Loader).

Then projects each rate to ``--epochs`` epochs of the whole split (record count from the LMDB's
metadata), says how many images and seconds each figure rests on (a warning when too few), and
names the limiting stage from the pipeline's steady window: well below the stream rate the CPU
(decode) limits and more workers/cores help; otherwise the disk does. Where the split gives no
such window (it fits the shuffle buffer) the stage is not guessed, and the output says how to
see it (``--buffer-size``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

from imagenet_seq.format import SPLITS
from imagenet_seq.read import readahead
from imagenet_seq.read.evict import evict
from imagenet_seq.tools import bench_ranks
from imagenet_seq.tools.bench_measure import (MAX_EPOCHS, MIN_IMAGES, MIN_SECONDS, BenchError,
                                              Measurement, progress_bar, tick)
from imagenet_seq.tools.bench_report import format_table, judge_limit, write_plot
from imagenet_seq.tools.info import summary_line

__all__ = ["MIN_IMAGES", "MIN_SECONDS", "MAX_EPOCHS", "BenchError",
           "Measurement", "measure_stream", "measure_pipeline", "list_images", "measure_folder",
           "build_parser", "open_split", "run", "main"]

def measure_stream(reader, seconds: float, progress: bool = True) -> Measurement:
    """Stream records from the start of the file for ``seconds``: a file read in less starts
    again, its page cache dropped before each pass (so every pass reads the device)."""
    m = Measurement("stream")
    bar = progress_bar("raw stream", seconds, progress)
    spent = 0.0
    try:
        while spent < seconds:
            m.evicted, m.note = evict(reader.paths)  # not timed: between passes
            m.passes += 1
            t0 = time.monotonic()
            try:
                for _, jpeg, _ in reader.read_range(0, len(reader)):
                    m.images += 1
                    m.bytes += len(jpeg)
                    if m.images % 64 == 0:
                        tick(bar, t0 - spent, m)
                        if spent + time.monotonic() - t0 >= seconds:
                            break
            finally:
                spent += time.monotonic() - t0
    except KeyboardInterrupt:
        m.interrupted = True
    finally:
        m.seconds = spent
        m.method = f"{m.passes} sequential pass(es) over the file, each from a dropped page cache"
        bar.close()
        reader.close()
    return m


def measure_pipeline(root: str, split: str, batch_size: int, workers: int, seconds: float,
                     mean_record_bytes: float, path: str, progress: bool = True,
                     buffer_size: Optional[int] = None) -> Measurement:
    """The full Loader's images/s from the device, its buffer fill counted.

    Epoch 0 runs from a dropped page cache. If it ends within ``seconds`` of its first batch,
    the figure is whole epochs (``method`` starts with ``whole epochs``): more epochs, each from
    a dropped page cache, while they fit in ``seconds``; images / their total time, each
    epoch's fill inside. Otherwise the figure is the steady window: from the first batch (the
    shuffle buffer is full) for ``seconds``, closed early once the reader may have read the
    last record (what follows comes from memory); the fill before it (``fill_s``) is added to
    every epoch of the projection. A split that fits the buffer but whose epoch outlasts
    ``seconds`` is read whole in the fill: its epoch is the fill plus decoding from memory at the
    rate measured after it. Either way ``steady_images``/``steady_s`` sum the epochs'
    steady windows (what the limiting stage is judged on); bytes = images x mean record.
    """
    from imagenet_seq.data import Loader  # the heavy part (torch, workers), imported only when measured

    m = Measurement("pipeline")
    # overlap_epochs=False: each epoch is timed from a dropped page cache, and a Loader reading
    # the next epoch ahead during this one's tail would have read part of it before the drop
    loader = Loader(root, split, batch_size=batch_size, num_workers=workers,
                    shuffle=(split == "train"), buffer_size=buffer_size, overlap_epochs=False)
    settings = loader.settings
    m.buffer_records = settings.order.plan.buffer_size
    # delivered images up to which the reader is still reading from the device: the buffer's
    # records, the batches in flight and the read-ahead's bytes were read ahead of them
    ahead = math.ceil(readahead.PREFETCH_BYTES / max(1.0, mean_record_bytes))
    device_end = (settings.order.records - m.buffer_records
                  - settings.runtime.prefetch * batch_size - ahead)
    m.fits_buffer = device_end <= batch_size  # not one batch while the reader still reads
    bar = progress_bar("full pipeline", seconds, progress)
    epochs: List[Tuple[int, float]] = []
    try:
        while not epochs or (sum(t for _, t in epochs) + epochs[-1][1] <= seconds
                             and len(epochs) < MAX_EPOCHS):
            m.evicted, m.note = evict(path)  # not timed: between epochs
            t0 = time.monotonic()
            first, n0, delivered, steady, after = None, 0, 0, (0, 0.0), (0, 0.0)
            for images, _ in loader:
                now = time.monotonic()
                delivered += len(images)
                if first is None:  # workers started, the shuffle buffer full
                    first, n0 = now, delivered
                    m.startup_s = m.startup_s or now - t0
                    continue
                after = (delivered - n0, now - first)
                if delivered <= device_end:
                    steady = after
                if not epochs:
                    m.images = delivered
                    tick(bar, first, m)
                    if now - first >= seconds:
                        break
            else:
                epochs.append((delivered, time.monotonic() - t0))
            m.steady_images += steady[0]
            m.steady_s += steady[1]
            if not epochs:
                break  # epoch 0 outlasts --seconds: the steady window is the figure
    except KeyboardInterrupt:
        m.interrupted = True
    finally:
        bar.close()
        loader.close()
    if epochs:
        m.method = (f"whole epochs ({len(epochs)}, each from a dropped page cache, its buffer "
                    "fill counted)")
        m.images, m.seconds = sum(n for n, _ in epochs), sum(t for _, t in epochs)
        m.passes = len(epochs)
    elif m.fits_buffer:  # every record was read in the fill; the rest of an epoch is decoding
        m.method = (f"the split fits the shuffle buffer: read whole in the fill "
                    f"({m.startup_s:.1f} s), then decoded from memory; epoch = fill + "
                    "decoding at the rate measured after it")
        m.images, m.seconds = after
        m.fill_s, m.passes = m.startup_s, 1
    else:
        m.method = ("steady window after the shuffle buffer filled, records still coming "
                    f"from the device; the fill ({m.startup_s:.1f} s) is added to every epoch")
        m.images, m.seconds = m.steady_images, m.steady_s
        m.fill_s, m.passes = m.startup_s, 1
    m.bytes = int(m.images * mean_record_bytes)
    return m


def list_images(folder: str) -> List[str]:
    """Every image file under ``folder`` (by extension), sorted.

    Raises:
        BenchError: ``folder`` is missing or holds no images.
    """
    from imagenet_seq.convert.images import IMAGE_EXTENSIONS  # what the converter reads

    if not os.path.isdir(folder):
        raise BenchError(f"--folder {folder!r} is not a folder; pass the raw ImageFolder split, "
                         "e.g. /data/imagenet/train")
    found = []
    for d, _, files in os.walk(folder):
        found.extend(os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise BenchError(f"--folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "pass the raw ImageFolder split, e.g. /data/imagenet/train")
    return sorted(found)


def measure_folder(files: List[str], seconds: float, workers: int, seed: int = 0,
                   progress: bool = True) -> Measurement:
    """Read whole files in a random order with ``workers`` threads (like DataLoader workers).

    Each file's cached pages are dropped just before it is read. Files are read, not decoded:
    an upper bound of what torchvision's ImageFolder gets from the same disk.
    """
    from concurrent.futures import ThreadPoolExecutor

    m = Measurement("folder")
    order = list(files)
    random.Random(seed).shuffle(order)
    failed = []

    def read(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                failed.append(path)
            n = 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    return n
                n += len(b)
        finally:
            os.close(fd)

    bar = progress_bar("folder files", seconds, progress)
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        window = max(1, workers) * 4
        pending = [pool.submit(read, p) for p in order[:window]]
        nxt = window
        while pending:
            m.bytes += pending.pop(0).result()
            m.images += 1
            if nxt < len(order) and time.monotonic() - t0 < seconds:
                pending.append(pool.submit(read, order[nxt]))
                nxt += 1
            if m.images % 16 == 0:
                tick(bar, t0, m)
    except KeyboardInterrupt:
        m.interrupted = True
    finally:
        m.seconds = time.monotonic() - t0
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    m.evicted = not failed
    m.note = ("page cache of each file dropped before its read; files are read, not decoded, so "
              "this is an upper bound of torchvision ImageFolder's rate" if not failed else
              f"could not drop the page cache of {len(failed)} files; results may be RAM speed")
    return m


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagenet-seq-bench",
        description="Measure how fast this storage feeds training from the LMDBs (and from the "
                    "raw folders) and project hours for N epochs.")
    p.add_argument("lmdb", help="folder with ILSVRC-<split>.lmdb (output of preprocess), or the file")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decode workers of the Loader / reader threads for --folder")
    p.add_argument("--folder", help="the raw ImageFolder split to compare with")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each measurement")
    p.add_argument("--buffer-size", type=int,
                   help="the Loader's shuffle buffer in records (default: the Loader's, 2 GiB "
                        "/ mean record); a split that fits the buffer never overlaps reading "
                        "and decoding: a smaller buffer shows which stage limits")
    p.add_argument("--ranks", type=int,
                   help="N ranks on this machine: compare per-rank readers with the node reader "
                        "(raw records, N processes; the pipeline is not measured)")
    p.add_argument("--skip-pipeline", action="store_true", help="measure raw streaming only")
    p.add_argument("--advise", action="store_true",
                   help="measure disk, CPU and a sample's sizes (about a minute), predict "
                        "the hours of each choice (as is / --max-size 500, 400, 320; "
                        "workers; ranks) and recommend one (see --world-size, --source)")
    p.add_argument("--world-size", type=int, default=1, metavar="W",
                   help="with --advise: predict ranks 1..W of one machine on this disk")
    p.add_argument("--source", metavar="DIR",
                   help="with --advise: the ImageNet folder to convert from; its read rate "
                        "gives conversion hours")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("seconds", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name.replace('_', '-')}={getattr(args, name)}; expected > 0")
    if args.workers < 0:
        raise BenchError(f"--workers={args.workers}; expected >= 0")
    if args.buffer_size is not None and args.buffer_size < 0:
        raise BenchError(f"--buffer-size={args.buffer_size}; expected >= 0 records")
    if args.ranks is not None and args.ranks < 2:
        raise BenchError(f"--ranks={args.ranks}; expected >= 2 ranks on this machine (one "
                         "rank has nothing to share: run without --ranks)")


def open_split(root: str, split: str):
    """The :class:`SplitReader`, with every way the path can be wrong turned into BenchError."""
    import lmdb

    from imagenet_seq.read.reader import SplitReader

    try:
        reader = SplitReader(root, split)
    except (FileNotFoundError, ValueError, lmdb.Error) as e:
        raise BenchError(f"{root!r} is not an LMDB folder written by imagenet-seq-preprocess: "
                         f"{e}") from None
    if len(reader) == 0:
        raise BenchError(f"the {split!r} split in {reader.path} holds no records; re-run "
                         "preprocess on a folder with images")
    return reader


def run(args: argparse.Namespace) -> Dict:
    """Measure and project; returns the result dict (the ``--json`` object)."""
    _check(args)
    files = list_images(args.folder) if args.folder else None
    reader = open_split(args.lmdb, args.split)
    records = len(reader)
    total = reader.meta.total_bytes
    indexed = reader.indexed
    reader.close()  # the stream measurement opens it again after evicting the file
    result: Dict = {"path": args.lmdb, "split": args.split, "records": records,
                    "epochs": args.epochs, "seconds": args.seconds, "notes": [],
                    "warnings": [], "runtime": summary_line()}
    measured: List[Measurement] = []
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    try:
        s = measure_stream(reader, args.seconds, progress)
        measured.append(s)
        mean = total / records if total else (s.bytes / s.images if s.images else 0.0)
        result["mean_record_kb"] = mean / 1e3
        if args.ranks and not s.interrupted:
            result["notes"].append("pipeline: not measured with --ranks (run without it for "
                                   "the one-rank Loader's projection)")
            result["ranks"] = bench_ranks.compare(
                args.lmdb, args.split, args.ranks, args.seconds,
                bench_ranks.warmup_for(args.seconds), records=records, epochs=args.epochs,
                node_ok=None if indexed else _node_needs_index(reader.path),
                evict_path=reader.paths)
        elif not s.interrupted and not args.skip_pipeline:
            try:
                measured.append(measure_pipeline(args.lmdb, args.split, args.batch_size,
                                                 args.workers, args.seconds, mean, reader.paths,
                                                 progress, args.buffer_size))
            except ImportError as e:
                result["notes"].append(f"pipeline: not measured ({e})")
        if files and not measured[-1].interrupted:
            measured.append(measure_folder(files, args.seconds, args.workers, progress=progress))
    except KeyboardInterrupt:
        result["interrupted"] = True
    result.setdefault("mean_record_kb", 0.0)
    result["offsets_index"] = indexed
    if not indexed and not reader.legacy:
        result["notes"].append(
            "records: read through LMDB's B-tree, this file has no offsets index (converted by "
            "an older imagenet_seq); `python -m imagenet_seq.format.offsets "
            f"{reader.path}` adds it and saves the seeks to B-tree pages")
    for m in measured:
        result[m.name] = m.projection(records, args.epochs)
        result["notes"].append(f"{m.name}: {m.note}")
        result["interrupted"] = result.get("interrupted", False) or m.interrupted
        if m.too_little():
            result["warnings"].append(m.too_little())
    rows = result.get("ranks", {}).get("rows", {}).values()
    result["page_cache_evicted"] = bool(measured) and all(m.evicted for m in measured) and \
        all(r.get("page_cache_evicted", True) for r in rows)
    pipe = next((m for m in measured if m.name == "pipeline"), None)
    if pipe is not None and "stream" in result and result["stream"]["images_per_s"] > 0:
        judge_limit(result, pipe, records, args.batch_size)
    if "folder" in result and result["folder"]["images_per_s"] > 0:
        best = result.get("pipeline", result["stream"])
        result["speedup"] = best["images_per_s"] / result["folder"]["images_per_s"]
    return result


def _node_needs_index(path: str) -> str:
    from imagenet_seq.format.offsets import rebuild_command

    return (f"{path} has no offsets index, which the node reader needs; `"
            f"{rebuild_command(path)}` adds it (writes into the file)")


def _finite(obj):
    """inf (nothing measured) -> None, so the output stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return None
    return obj


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.advise:
        return _advise(args)
    try:
        result = run(args)
    except BenchError as e:
        print(f"imagenet-seq-bench: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_finite(result), indent=1))
    else:
        print(format_table(result))
    if args.plot and any(k in result for k in ("stream", "pipeline", "folder")):
        write_plot(result, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    return 130 if result.get("interrupted") else 0


def _advise(args: argparse.Namespace) -> int:
    """``--advise``: :mod:`.advise` measures and predicts, :mod:`.advise_report` prints."""
    from imagenet_seq.tools.advise import run_advise
    from imagenet_seq.tools.advise_report import format_advice, write_advice_plot

    try:
        _check(args)
        result = run_advise(args, open_split, measure_stream)
    except BenchError as e:
        print(f"imagenet-seq-bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_finite(result), indent=1) if args.json else format_advice(result))
    if args.plot:
        try:
            write_advice_plot(result, args.plot)
        except ImportError as e:
            print(f"imagenet-seq-bench: error: {e}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
