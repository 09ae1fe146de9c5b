"""Slow-disk benchmark: folders vs the original tool vs imagenet_seq on an emulated HDD and NFS.

    python benchmarks/slow_disk.py [--seconds 15] [--workdir /tmp/imagenet_seq_slow_disk]

Makes ImageNet-like JPEGs (``imagenet_seq.tools.sample``), converts them with preprocess, then for each
emulated device (``benchmarks/slowfs.py``, mounted fresh -- cold cache -- per measurement)
measures, each for ``--seconds``:

* ImageFolder + DataLoader: torchvision's when a python with torchvision exists (``--tv-python``,
  default ``/opt/tv-venv/bin/python``); otherwise a PIL stand-in doing the same file reads,
  decode, RandomResizedCrop and flip (labelled so in the results);
* the original tool's design: tensorpack ``LMDBData(shuffle=False)`` -> ``LocallyShuffleData`` ->
  decode + augment -> ``MultiProcessRunnerZMQ(.., workers)`` -> ``BatchData`` (every ZMQ worker
  runs its own copy of the reader);
* the imagenet_seq Loader (CPU decode path), and raw record streaming (``SplitReader``);
* on the HDD: 1, 2 and 4 ranks (separate processes, ``Loader(rank=r, world_size=W)`` with the
  decode replaced by a byte count) streaming their shards from the one emulated disk, once per
  ``--prefetch-mb`` x ``--chunk-size`` setting.

``--prefetch-mb`` sets ``imagenet_seq.read.readahead.PREFETCH_BYTES`` (the span read-ahead of
``SplitReader.read_range``) in the measurement processes; the first value is used for the
single-reader methods. ``--chunk-size`` is the Loader's ``chunk_size`` (records per contiguous
span); the read-ahead never runs past a span, so a window larger than a chunk changes nothing.

Writes ``benchmarks/results/slow_disk.md`` (+ ``slow_disk.png``, ``slow_disk.json``; rebuild the
first two from the JSON with ``python benchmarks/slow_disk_report.py``). Hours are
projected for 90 epochs of ImageNet-1k (1,281,167 images, ~110 KB mean) by scaling the measured
MB/s by the mean record size (the disk moves bytes; our sample JPEGs are ~90 KB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_IMAGES = 1_281_167
IMAGENET_MEAN_BYTES = 110e3
EPOCHS = 90
BATCH = 64
DEFAULT_PREFETCH_MB = 64  # imagenet_seq.read.readahead.PREFETCH_BYTES
DEFAULT_CHUNK = 1024  # imagenet_seq.plan.order.DEFAULT_CHUNK_RECORDS
SHUFFLE_BUFFER = 512  # records: ~4 % of the sample LMDB (ImageNet default: 19,500 = 1.5 %)


# ---------------------------------------------------------------------------------------------
# measurements; each runs in its own process: `python slow_disk.py _measure KIND ...` -> JSON
def _result(images: int, nbytes: int, t0: float, **extra) -> dict:
    return dict(images=images, bytes=nbytes, seconds=time.monotonic() - t0, **extra)


def measure_folder(train_dir: str, seconds: float, workers: int, **_) -> dict:
    """ImageFolder + DataLoader with RandomResizedCrop + flip: torchvision's, or a PIL stand-in."""
    import torch

    try:
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.RandomResizedCrop(224),
                                 transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
        ds = datasets.ImageFolder(train_dir, tf)
        impl = "torchvision"
    except ImportError:
        ds = _PILFolder(train_dir)
        impl = "PIL stand-in (torchvision not installed)"
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers)
    t0, n = time.monotonic(), 0
    for images, _ in dl:
        n += len(images)
        if time.monotonic() - t0 >= seconds:
            break
    sizes = [os.path.getsize(p) for p, _ in ds.samples]
    return _result(n, int(n * sum(sizes) / len(sizes)), t0, impl=impl)


class _PILFolder:
    """What torchvision's ImageFolder + RandomResizedCrop + flip does, with PIL alone."""

    def __init__(self, root: str):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(root, c)))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        path, label = self.samples[i]
        rng = np.random.default_rng()
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        w, h = img.size
        area = w * h * rng.uniform(0.08, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * ar))))
        ch = int(min(h, round(np.sqrt(area / ar))))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = img.resize((224, 224), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), label


def measure_original(lmdb_file: str, seconds: float, workers: int, **_) -> dict:
    """The original tool's tensorpack flow on the same LMDB (records decoded from our format)."""
    import cv2
    import numpy as np
    from tensorpack import dataflow as td
    from tensorpack.dataflow import imgaug

    def decode(dp):
        key, value = dp
        if key.startswith(b"__"):
            return None
        img = cv2.imdecode(np.frombuffer(value, np.uint8, offset=4), cv2.IMREAD_COLOR)
        return [img, int.from_bytes(value[:4], "little")]

    ds = td.LMDBData(lmdb_file, shuffle=False)
    ds = td.LocallyShuffleData(ds, SHUFFLE_BUFFER)
    # the original also had MultiProcessRunner(ds, 5000, 1) here: a prefetch queue only, and
    # tensorpack 0.11 cannot start it inside the ZMQ workers below (created in another process)
    ds = td.MapData(ds, decode)
    ds = td.AugmentImageComponent(ds, [imgaug.GoogleNetRandomCropAndResize(),
                                       imgaug.Flip(horiz=True)])
    ds = td.MultiProcessRunnerZMQ(ds, workers)
    ds = td.BatchData(ds, BATCH)
    ds.reset_state()
    t0, n = time.monotonic(), 0
    for images, _ in ds:
        n += len(images)
        if time.monotonic() - t0 >= seconds:
            break
    mean = _mean_record_bytes(lmdb_file)
    return _result(n, int(n * mean), t0, note=f"each of the {workers} ZMQ workers reads the "
                   "whole file: records repeat within an epoch")


def _mean_record_bytes(lmdb_file: str) -> float:
    from imagenet_seq.read.reader import SplitReader

    meta = SplitReader(lmdb_file, "train").meta
    return meta.total_bytes / meta.num_records


def measure_loader(lmdb_file: str, seconds: float, workers: int, rank: int = 0,
                   world_size: int = 1, decode: bool = True,
                   chunk_size: Optional[int] = None) -> dict:
    """The imagenet_seq Loader; ``decode=False`` swaps decoding for a byte count (I/O only)."""
    from imagenet_seq.data import Loader

    kw = {} if decode else dict(decoder=_count_bytes)
    loader = Loader(lmdb_file, "train", batch_size=BATCH, num_workers=workers,
                    buffer_size=SHUFFLE_BUFFER, rank=rank, world_size=world_size,
                    chunk_size=chunk_size, **kw)
    mean = loader.meta.total_bytes / loader.dataset_size
    t0, n, nbytes = time.monotonic(), 0, 0
    samples = [(t0, 0)]  # (time, bytes so far): the parent cuts out the window all ranks read
    for images, targets in loader:
        n += len(targets)
        nbytes += int(images.sum()) if not decode else int(len(targets) * mean)
        samples.append((time.monotonic(), nbytes))
        if samples[-1][0] - t0 >= seconds:
            break
    return _result(n, nbytes, t0, t_start=t0, t_end=time.monotonic(), rank=rank,
                   samples=samples)


def _count_bytes(jpegs, labels):
    import torch

    return torch.tensor([len(j) for j in jpegs], dtype=torch.int64), torch.as_tensor(labels)


def measure_stream(lmdb_file: str, seconds: float, workers: int, **_) -> dict:
    from imagenet_seq.read.reader import SplitReader

    reader = SplitReader(lmdb_file, "train")
    t0, n, nbytes = time.monotonic(), 0, 0
    for _, jpeg, _ in reader.read_all():
        n += 1
        nbytes += len(jpeg)
        if n % 64 == 0 and time.monotonic() - t0 >= seconds:
            break
    return _result(n, nbytes, t0)


MEASURES = {"folder": measure_folder, "original": measure_original, "loader": measure_loader,
            "stream": measure_stream}


def _measure_main(argv) -> int:
    p = argparse.ArgumentParser(prog="slow_disk.py _measure")
    p.add_argument("kind", choices=list(MEASURES) + ["rank"])
    p.add_argument("target")
    p.add_argument("seconds", type=float)
    p.add_argument("workers", type=int)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--prefetch-mb", type=float, default=None)
    p.add_argument("--chunk-size", type=int, default=None)
    a = p.parse_args(argv)
    if a.prefetch_mb is not None and a.kind != "folder":  # before any reader exists; forked workers inherit it
        from imagenet_seq.read import readahead

        readahead.PREFETCH_BYTES = int(a.prefetch_mb * (1 << 20))
    if a.kind == "rank":
        out = measure_loader(a.target, a.seconds, a.workers, a.rank, a.world_size, decode=False,
                             chunk_size=a.chunk_size)
    elif a.kind == "loader":
        out = measure_loader(a.target, a.seconds, a.workers, chunk_size=a.chunk_size)
    else:
        out = MEASURES[a.kind](a.target, a.seconds, a.workers)
    if a.kind != "folder":  # torchvision's python may lack imagenet_seq
        from imagenet_seq.read import readahead

        out["prefetch_bytes"] = readahead.PREFETCH_BYTES
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# orchestration: data, fresh mounts, child processes
def prepare(workdir: str, classes: int, per_class: int, copies: int) -> dict:
    """ImageNet-like JPEGs (cached in ``workdir``); the LMDB holds ``copies`` of each image."""
    sys.path.insert(0, os.path.dirname(HERE))
    from imagenet_seq.convert.cli import main as preprocess
    from imagenet_seq.tools.sample import make_sample_imagefolder

    data = os.path.join(workdir, "data")
    tree = os.path.join(workdir, "tree")
    # "-files": the copies are files of their own (hard links are stored once since the
    # converter skips repeats of one file), so caches made from links are rebuilt
    done = os.path.join(workdir, f"ready-{classes}-{per_class}-{copies}-files")
    if not os.path.exists(done):
        shutil.rmtree(data, ignore_errors=True)
        if not os.path.isdir(os.path.join(tree, "train")) or \
                len(os.listdir(os.path.join(tree, "train"))) != classes:
            shutil.rmtree(tree, ignore_errors=True)
            print(f"making {classes * per_class} ImageNet-like JPEGs in {tree} ...", flush=True)
            make_sample_imagefolder(tree, train_per_class=per_class, val_per_class=1,
                                    num_classes=classes, seed=0, repeat_photos=True)
        # the folder baseline reads data/train; the LMDB is made from `copies` copies of it
        shutil.copytree(os.path.join(tree, "train"), os.path.join(data, "train"),
                        copy_function=os.link)
        big = os.path.join(workdir, "big")
        shutil.rmtree(big, ignore_errors=True)
        for c in sorted(os.listdir(os.path.join(tree, "train"))):
            os.makedirs(os.path.join(big, "train", c))
            for f in os.listdir(os.path.join(tree, "train", c)):
                for k in range(copies):
                    shutil.copyfile(os.path.join(tree, "train", c, f),
                                    os.path.join(big, "train", c, f"{k}_{f}"))
        shutil.copytree(os.path.join(tree, "val"), os.path.join(big, "val"), copy_function=os.link)
        if preprocess([big, os.path.join(data, "lmdb"), "--no-progress"]) != 0:
            raise RuntimeError("preprocess failed")
        shutil.rmtree(big)
        open(done, "w").close()
    return {"data": data, "train": "train", "lmdb": os.path.join("lmdb", "ILSVRC-train.lmdb")}


def run_measurement(cmd, timeout: float) -> dict:
    """Run one measurement process (its own process group, killed whole on timeout) and return
    the JSON of its ``RESULT `` line; RuntimeError with its stderr when it has none."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise RuntimeError(f"{cmd[2:]} ran past {timeout:.0f} s: {err[-1500:]}")
    for line in out.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{cmd[2:]} failed (rc {proc.returncode}): {err[-3000:]}")


def measure_on_device(kind: str, device: str, paths: dict, args, ranks: int = 0,
                      prefetch_mb: Optional[float] = None,
                      chunk_size: Optional[int] = None) -> dict:
    """One measurement (or ``ranks`` rank processes at once) on a fresh emulated mount."""
    sys.path.insert(0, HERE)
    import slowfs

    mnt = os.path.join(args.workdir, "mnt")
    target_rel = paths["train"] if kind == "folder" else paths["lmdb"]
    kind = "rank" if ranks else kind  # ranks: Loader, I/O only
    prefetch_mb = args.prefetch_mb[0] if prefetch_mb is None else prefetch_mb
    chunk_size = args.chunk_size[0] if chunk_size is None else chunk_size
    opts = [f"--prefetch-mb={prefetch_mb:g}"] + ([f"--chunk-size={chunk_size}"]
                                                 if chunk_size else [])
    opts = [] if kind == "folder" else opts
    python = args.tv_python if kind == "folder" and os.path.exists(args.tv_python) \
        else sys.executable
    with slowfs.mounted(paths["data"], mnt, device, args.model_args[device]) as stats:
        target = os.path.join(mnt, target_rel)
        base = [python, os.path.abspath(__file__), "_measure"]
        limit = args.seconds + args.warmup + 120
        if ranks:
            cmds = [base + [kind, target, str(args.seconds + args.warmup), "0", f"--rank={r}",
                            f"--world-size={ranks}"] + opts for r in range(ranks)]
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(ranks) as pool:
                parts = list(pool.map(lambda c: run_measurement(c, limit), cmds))
            from imagenet_seq.tools.bench_ranks import all_ranks_window

            t0 = min(p["t_start"] for p in parts)
            t1 = max(p["t_end"] for p in parts)
            r = dict(images=sum(p["images"] for p in parts),
                     bytes=sum(p["bytes"] for p in parts), seconds=t1 - t0,
                     per_rank_mb_per_s=[p["bytes"] / p["seconds"] / 1e6 for p in parts],
                     # the warm-up leaves out each rank's shuffle-buffer and read-ahead
                     # fill (~110 MB a rank here), which an epoch does once
                     all_ranks=all_ranks_window(parts, args.warmup))
        else:
            r = run_measurement(
                base + [kind, target, str(args.seconds), str(args.workers)] + opts, limit)
            r.pop("t_start", None), r.pop("t_end", None)
        r["prefetch_bytes"] = parts[0]["prefetch_bytes"] if ranks else r.get("prefetch_bytes")
    r.update(kind=kind, device=device, ranks=ranks, prefetch_mb=prefetch_mb,
             chunk_size=chunk_size or DEFAULT_CHUNK,
             images_per_s=r["images"] / r["seconds"], mb_per_s=r["bytes"] / r["seconds"] / 1e6,
             device_stats=dict(stats))
    if r.get("all_ranks"):
        # ranks: the rate while all of them read (first-start to last-end kept for reference)
        r["mb_per_s_first_to_last"] = r["mb_per_s"]
        r["images_per_s"] *= r["all_ranks"]["mb_per_s"] / max(r["mb_per_s"], 1e-9)
        r["mb_per_s"] = r["all_ranks"]["mb_per_s"]
    r["hours_imagenet"] = IMAGENET_IMAGES * EPOCHS * IMAGENET_MEAN_BYTES / (r["mb_per_s"] * 1e6) \
        / 3600 if r["mb_per_s"] > 0 else float("inf")
    print(f"  {device:4} {kind:9}{f' x{ranks}' if ranks else '   '} "
          f"[prefetch {prefetch_mb:g} MB, chunk {r['chunk_size']}]: "
          f"{r['images_per_s']:8.1f} img/s {r['mb_per_s']:7.1f} MB/s "
          f"{r['hours_imagenet']:8.1f} h/90 ep  ({r['images']} images in {r['seconds']:.1f} s"
          + (f"; all ranks reading for {r['all_ranks']['seconds']:.1f} s, first start to last "
             f"end {r['mb_per_s_first_to_last']:.1f} MB/s" if r.get("all_ranks") else "") + ")",
          flush=True)
    return r


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", HERE, "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out[:100] or "unknown"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        return _measure_main(argv[1:])
    p = argparse.ArgumentParser(description="slow-disk benchmark (FUSE-emulated HDD and NFS)")
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="rank measurements: seconds each rank reads before the window counted "
                        "(fills shuffle buffer and read-ahead; ranks then run seconds + warmup)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workdir", default="/tmp/imagenet_seq_slow_disk")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--classes", type=int, default=15)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--copies", type=int, default=12,
                   help="LMDB copies of each image (12: ~3.2 GB, 20 s of reading at 150 MB/s)")
    p.add_argument("--devices", nargs="+", default=["hdd", "nfs"], choices=["hdd", "nfs"])
    p.add_argument("--methods", nargs="*", choices=list(MEASURES),
                   default=["folder", "original", "loader", "stream"])
    p.add_argument("--ranks", nargs="*", type=int, default=[1, 2, 4])
    p.add_argument("--prefetch-mb", nargs="+", type=float, default=[DEFAULT_PREFETCH_MB],
                   help="imagenet_seq.read.readahead.PREFETCH_BYTES in MB for the measurement processes; "
                        "ranks are measured with each value, the methods with the first")
    p.add_argument("--chunk-size", nargs="+", type=int, default=[DEFAULT_CHUNK],
                   help="Loader chunk_size (records per span); ranks are measured with each "
                        "value, the Loader method with the first")
    p.add_argument("--hdd-args", default="", help="extra slowfs.py options for the HDD")
    p.add_argument("--nfs-args", default="", help="extra slowfs.py options for NFS")
    p.add_argument("--tv-python", default="/opt/tv-venv/bin/python",
                   help="a python with torchvision for the ImageFolder baseline")
    args = p.parse_args(argv)
    args.argv = argv
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup}; expected >= 0")
    if args.seconds <= 0:
        p.error(f"--seconds={args.seconds}; expected > 0")
    if min(args.prefetch_mb) < 0:
        p.error(f"--prefetch-mb={min(args.prefetch_mb):g}; expected >= 0 (0 turns it off)")
    if min(args.chunk_size) < 1:
        p.error(f"--chunk-size={min(args.chunk_size)}; expected >= 1 records")
    sys.path.insert(0, HERE)
    import shlex

    import slowfs
    from slow_disk_report import targets, write_plot, write_report

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        print(f"slow_disk: FUSE unavailable ({reason}); nothing measured", file=sys.stderr)
        return 2
    args.model_args, args.bandwidth = {}, {}
    for dev in ("hdd", "nfs"):
        extra = shlex.split(getattr(args, f"{dev}_args"))
        args.model_args[dev] = extra
        mp = argparse.ArgumentParser()
        slowfs.add_model_args(mp)
        args.bandwidth[dev] = slowfs.make_model(mp.parse_args(["--device", dev] + extra)).bandwidth
    os.makedirs(args.out, exist_ok=True)
    paths = prepare(args.workdir, args.classes, args.per_class, args.copies)
    from imagenet_seq.read.reader import SplitReader

    meta = SplitReader(os.path.join(paths["data"], paths["lmdb"]), "train").meta
    info = {"machine": f"{os.cpu_count()} CPU cores, Linux {os.uname().release}, load average "
                       f"at start {' / '.join(f'{x:.2f}' for x in os.getloadavg())} "
                       "(1 / 5 / 15 min; other jobs share the cores)",
            "commit": _commit(),
            "data": f"{args.classes * args.per_class} ImageNet-like JPEGs (imagenet_seq.tools.sample, "
                    f"mean {meta.total_bytes / meta.num_records / 1e3:.0f} KB); the LMDB holds "
                    f"{args.copies} copies of each ({meta.num_records} records, "
                    f"{meta.total_bytes / 1e6:.0f} MB)",
            "each measurement": f"{args.seconds:g} s on a fresh mount (cold cache), "
                                f"batch {BATCH}, {args.workers} workers, shuffle buffer "
                                f"{SHUFFLE_BUFFER} records",
            "HDD model": "8 ms seek + 4.17 ms rotation per non-contiguous request, 150 MB/s "
                         + " ".join(args.model_args["hdd"]),
            "NFS model": "0.5 ms round trip per request, 110 MB/s link, 8 requests in flight "
                         + " ".join(args.model_args["nfs"])}
    res, failed = [], []

    def attempt(*a, **k):
        try:
            res.append(measure_on_device(*a, **k))
        except RuntimeError as e:  # one broken method must not lose the others' numbers
            print(f"  FAILED {a[:2]} {k}: {str(e)[-600:]}", file=sys.stderr, flush=True)
            failed.append(f"{a[1]} {a[0]} {k}: {str(e)[-300:]}")

    try:
        for dev in args.devices:
            for kind in args.methods:
                attempt(kind, dev, paths, args)
        if "hdd" in args.devices:
            for mb in args.prefetch_mb:
                for chunk in args.chunk_size:
                    for n in args.ranks:
                        attempt("rank", "hdd", paths, args, ranks=n, prefetch_mb=mb,
                                chunk_size=chunk)
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    info["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    info["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = {k: getattr(args, k) for k in ("argv", "devices", "bandwidth", "prefetch_mb",
                                           "chunk_size")}
    with open(os.path.join(args.out, "slow_disk.json"), "w") as f:
        json.dump({"results": res, "setup": info, "failed": failed, "args": saved}, f, indent=1)
    print(write_report(res, args, info, failed))
    print(write_plot(res, args))
    for what, value, ok in targets(res, args):
        print(f"{what}: {value} ({'met' if ok else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
