"""``imagenet-seq-bench``: how many hours N epochs will take on *this* storage.

Measures, each with the files' page cache dropped first (so the disk is measured, not RAM):

* ``stream``: raw record streaming, one cursor walking the LMDB (the disk's sequential rate);
* ``pipeline``: the full :class:`imagenet_seq.data.Loader` (read, shuffle, decode, augment, batch);
* ``folder`` (``--folder``): random-order reads of the raw ImageFolder's files.

Then projects each rate to ``--epochs`` epochs of the whole split (record count from the LMDB's
metadata) and names the limiting stage: when the pipeline runs well below the stream rate the
CPU (decode) limits and more workers/cores help; otherwise the disk does.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from imagenet_seq.read.evict import evict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# the pipeline counts as disk-bound while it keeps this fraction of the raw stream's rate
DISK_BOUND_FRACTION = 0.8


class BenchError(ValueError):
    """Bad input: the message names the value and what to do."""


@dataclass
class Measurement:
    """What one measurement saw. ``seconds`` excludes start-up (workers, first batch)."""

    name: str
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    evicted: bool = False
    note: str = ""
    interrupted: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def projection(self, records: int, epochs: int) -> Dict[str, float]:
        """images/s, MB/s, seconds per epoch and hours for ``epochs`` epochs of ``records``."""
        rate = self.images_per_s
        epoch_s = records / rate if rate > 0 else float("inf")
        return {"images_per_s": rate, "mb_per_s": self.mb_per_s, "epoch_s": epoch_s,
                "hours": epoch_s * epochs / 3600.0, "images": self.images,
                "seconds": self.seconds, "startup_s": self.startup_s,
                "page_cache_evicted": self.evicted, "interrupted": self.interrupted}


def _progress(desc: str, seconds: float, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=round(seconds, 1), desc=desc, unit="s", disable=not enabled,
                bar_format="{desc}: {bar} {n:.0f}/{total:.0f} s {postfix}", leave=False)


def _tick(bar, t0: float, m: Measurement) -> None:
    bar.n = round(min(time.monotonic() - t0, bar.total), 1)
    bar.set_postfix_str(f"{m.images} images", refresh=True)


def measure_stream(reader, seconds: float, progress: bool = True) -> Measurement:
    """Stream records from the start of the file for ``seconds`` (or to its end)."""
    m = Measurement("stream")
    m.evicted, m.note = evict(reader.path)
    bar = _progress("raw stream", seconds, progress)
    t0 = time.monotonic()
    try:
        for _, jpeg, _ in reader.read_range(0, len(reader)):
            m.images += 1
            m.bytes += len(jpeg)
            if m.images % 64 == 0:
                _tick(bar, t0, m)
                if time.monotonic() - t0 >= seconds:
                    break
    except KeyboardInterrupt:
        m.interrupted = True
    finally:
        m.seconds = time.monotonic() - t0
        bar.close()
        reader.close()
    return m


def measure_pipeline(root: str, split: str, batch_size: int, workers: int, seconds: float,
                     mean_record_bytes: float, path: str, progress: bool = True) -> Measurement:
    """Iterate the full Loader for ``seconds`` after its first batch; bytes = images x mean size."""
    from imagenet_seq.data import Loader  # the heavy part (torch, workers), imported only when measured

    m = Measurement("pipeline")
    m.evicted, m.note = evict(path)
    bar = _progress("full pipeline", seconds, progress)
    t_start = time.monotonic()
    loader = Loader(root, split, batch_size=batch_size, num_workers=workers,
                    shuffle=(split == "train"))
    it = iter(loader)
    t0 = None
    try:
        for images, _ in it:
            if t0 is None:  # start-up (workers, first reads) is not the sustained rate
                t0 = time.monotonic()
                m.startup_s = t0 - t_start
                continue
            m.images += len(images)
            _tick(bar, t0, m)
            if time.monotonic() - t0 >= seconds:
                break
    except KeyboardInterrupt:
        m.interrupted = True
    finally:
        m.seconds = time.monotonic() - t0 if t0 is not None else 0.0
        m.bytes = int(m.images * mean_record_bytes)
        bar.close()
        close = getattr(it, "close", None) or getattr(loader, "close", None)
        if close is not None:
            close()
        del it, loader
    return m


def list_images(folder: str) -> List[str]:
    """Every image file under ``folder`` (by extension), sorted.

    Raises:
        BenchError: ``folder`` is missing or holds no images.
    """
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

    bar = _progress("folder files", seconds, progress)
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
                _tick(bar, t0, m)
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


def _rows(result: Dict) -> List[tuple]:
    labels = {"stream": "raw record stream", "pipeline": "full Loader pipeline",
              "folder": "ImageFolder files"}
    return [(labels[k], result[k]) for k in ("stream", "pipeline", "folder") if k in result]


def format_table(result: Dict) -> str:
    """The plain-text summary a person reads."""
    e = result["epochs"]
    head = (f"{result['path']} ({result['split']}): {result['records']:,} records, "
            f"mean {result['mean_record_kb']:.0f} KB, {e} epochs")
    lines = [head, "",
             f"{'measurement':<22}{'images/s':>10}{'MB/s':>9}{'epoch':>10}{f'{e} epochs':>12}",
             "-" * 63]
    for label, r in _rows(result):
        lines.append(f"{label:<22}{r['images_per_s']:>10,.0f}{r['mb_per_s']:>9.1f}"
                     f"{_duration(r['epoch_s']):>10}{_hours(r['hours']):>12}"
                     + ("  (interrupted)" if r["interrupted"] else ""))
    lines.append("")
    if "limit" in result:
        lines.append(f"limiting stage: {result['limit']}")
    if "speedup" in result:
        what = "LMDB pipeline" if "pipeline" in result else "raw LMDB stream"
        lines.append(f"speed-up of the {what} over folders: {result['speedup']:.1f}x")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _hours(h: float) -> str:
    if h == float("inf"):
        return "-"
    return f"{h:,.0f} h" if h >= 100 else (f"{h:.1f} h" if h >= 1 else f"{h:.3g} h")


def _duration(s: float) -> str:
    if s == float("inf"):
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def write_plot(result: Dict, path: str) -> None:
    """A bar chart of hours for the requested epochs, one bar per measurement."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'imagenet_seq[bench]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.8 * len(rows)), dpi=120)
    hours = [r["hours"] if r["hours"] != float("inf") else 0 for _, r in rows]
    colors = {"raw record stream": "#4c72b0", "full Loader pipeline": "#55a868",
              "ImageFolder files": "#c44e52"}
    bars = ax.barh([lbl for lbl, _ in rows], hours, color=[colors[lbl] for lbl, _ in rows])
    for bar, (_, r) in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f"  {_hours(r['hours'])}  ({r['images_per_s']:,.0f} img/s, {r['mb_per_s']:.0f} MB/s)",
                va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(hours + [1e-9]) * 1.6)
    ax.set_xlabel(f"hours for {result['epochs']} epochs of {result['records']:,} images")
    title = f"{os.path.basename(result['path'].rstrip('/'))} ({result['split']})"
    if "speedup" in result:
        what = "LMDB pipeline" if "pipeline" in result else "raw LMDB stream"
        title += f": {what} {result['speedup']:.1f}x faster than folders"
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagenet-seq-bench",
        description="Measure how fast this storage feeds training from the LMDBs (and from the "
                    "raw folders) and project hours for N epochs.")
    p.add_argument("lmdb", help="folder with ILSVRC-<split>.lmdb (output of preprocess), or the file")
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decode workers of the Loader / reader threads for --folder")
    p.add_argument("--folder", help="the raw ImageFolder split to compare with")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each measurement")
    p.add_argument("--skip-pipeline", action="store_true", help="measure raw streaming only")
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
                    "epochs": args.epochs, "seconds": args.seconds, "notes": []}
    measured: List[Measurement] = []
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    try:
        s = measure_stream(reader, args.seconds, progress)
        measured.append(s)
        mean = total / records if total else (s.bytes / s.images if s.images else 0.0)
        result["mean_record_kb"] = mean / 1e3
        if not s.interrupted and not args.skip_pipeline:
            try:
                measured.append(measure_pipeline(args.lmdb, args.split, args.batch_size,
                                                 args.workers, args.seconds, mean, reader.path,
                                                 progress))
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
    result["page_cache_evicted"] = bool(measured) and all(m.evicted for m in measured)
    if "stream" in result and "pipeline" in result and result["stream"]["images_per_s"] > 0:
        ratio = result["pipeline"]["images_per_s"] / result["stream"]["images_per_s"]
        result["limit"] = ("disk (the pipeline keeps up with the raw stream)"
                           if ratio >= DISK_BOUND_FRACTION else
                           f"CPU (decode: the pipeline runs at {ratio:.0%} of the disk's stream "
                           "rate; more workers/cores would help)")
        result["limit_stage"] = "disk" if ratio >= DISK_BOUND_FRACTION else "cpu"
    if "folder" in result and result["folder"]["images_per_s"] > 0:
        best = result.get("pipeline", result["stream"])
        result["speedup"] = best["images_per_s"] / result["folder"]["images_per_s"]
    return result


def _finite(obj):
    """inf (nothing measured) -> None, so the output stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return None
    return obj


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
