"""One vs two emulated HDDs: a split as one file, or as 2 shards read one reader per device.

    python benchmarks/multi_disk.py [--images 3000] [--copies 11] [--mb-per-s 150]
    python benchmarks/multi_disk.py --tiny        # a check that the script runs (seconds)

Data: ``benchmarks/data.py``'s ImageNet-like JPEGs (real-photo crops, 500x375, ~90 KB), the
train images copied ``--copies`` times (files of their own) and converted twice by
``preprocess_sequential.py``: one file, and ``--shards 2`` (the same records in the same order).
With 33,000 records the Loader's automatic chunk is ImageNet's 1,024 records (~90 MB here), so
the plan -- chunks permuted over the whole split, each from one shard -- has ImageNet's shape.

Each row reads one train epoch (shuffled, seed 0) in its own process, on fresh mounts of the
HDD emulator (``benchmarks/slowfs.py``: cold cache; 8 ms seek + 4.17 ms rotation per
non-contiguous request, ``--mb-per-s``), through the Loader's pipeline -- plan, read (one
reader per device group), shuffle buffer, batches -- with decode replaced by a byte count:
on this 2-core machine decoding (~970 images/s per core) would hide the disks (two emulated
HDDs deliver ~3,300 images/s of these JPEGs). Rows:

* ``one file, 1 HDD``: ``ILSVRC-train.lmdb`` on one mount (today's layout);
* ``2 shards, 2 HDDs``: shard 0 on one mount, shard 1 on another (two ``st_dev``: two
  readers), found through the manifest's folder and ``shard_dirs``;
* ``2 shards, 1 HDD``: both shards on one mount (one device: one reader).

Reported: images/s and MB/s over the whole epoch (first ``iter`` to last batch) and over its
middle 80 % of records, each mount's utilisation (busy time of the emulated disk / epoch time)
and the ratios against the one-file row of the same run. Goals (issue 26): two disks >= 1.8x
one disk; one disk sharded not slower than the one file. Writes ``<out>/multi_disk.json`` and
``<out>/multi_disk.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from slow_disk import _commit, run_measurement  # noqa: E402 - shared with slow_disk
BATCH = 64
BUFFER = 1024  # shuffle buffer in records (~90 MB here); it does not change what is read
TINY = dict(images=96, copies=2, mb_per_s=20.0, workdir="/tmp/imagenet_seq_multi_disk_tiny",
            scaled_chunk=4)
ROWS = (("one file, 1 HDD", "one", 1), ("2 shards, 2 HDDs", "two_disks", 2),
        ("2 shards, 1 HDD", "two_one_disk", 1))


# ---------------------------------------------------------------------------------------------
# one row: `python multi_disk.py _measure ROOT [--shard-dirs A,B]` -> RESULT {json}
def _count_bytes(jpegs, labels):
    import torch

    return torch.tensor([len(j) for j in jpegs], dtype=torch.int64), torch.as_tensor(labels)


def _measure_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="multi_disk.py _measure")
    p.add_argument("root")
    p.add_argument("--shard-dirs", default="")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--device-ahead", type=int, default=None, help="bytes")
    a = p.parse_args(argv)
    from imagenet_seq.data import Loader
    from imagenet_seq.plan import order
    from imagenet_seq.read import readahead

    if a.device_ahead:
        readahead.DEVICE_AHEAD_BYTES = a.device_ahead
    dirs = [d for d in a.shard_dirs.split(",") if d]
    t_make = time.monotonic()
    loader = Loader(a.root, "train", decoder=_count_bytes, batch_size=BATCH, num_workers=0,
                    buffer_size=BUFFER, seed=0, shard_dirs=dirs or None, stall_timeout=600,
                    chunk_size=a.chunk_size)
    reader = loader.reader
    cpu0, t0 = os.times(), time.monotonic()
    samples, n, nbytes = [(0.0, 0, 0)], 0, 0
    for sizes, targets in loader:
        n += len(targets)
        nbytes += int(sizes.sum())
        samples.append((time.monotonic() - t0, n, nbytes))
    seconds = time.monotonic() - t0
    cpu1 = os.times()
    loader.close()
    out = dict(images=n, bytes=nbytes, seconds=seconds, make_s=t0 - t_make,
               cpu_s=(cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
               samples=samples[:: max(1, len(samples) // 400)] + [samples[-1]],
               devices=reader.devices, shards=len(reader.files),
               covered=[{str(k): v for k, v in c.items()} for c in reader.covered],
               chunk=order.effective_chunk_size(loader.dataset_size, 1, a.chunk_size),
               records=loader.dataset_size,
               prefetch_bytes=readahead.PREFETCH_BYTES,
               device_ahead_bytes=readahead.DEVICE_AHEAD_BYTES)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _middle_rate(samples, lo: float = 0.1, hi: float = 0.9) -> Dict[str, float]:
    """images/s and MB/s between the batches where ``lo`` and ``hi`` of the records were out."""
    total = samples[-1][1]
    a = next(s for s in samples if s[1] >= lo * total)
    b = next(s for s in samples if s[1] >= hi * total)
    dt = max(b[0] - a[0], 1e-9)
    return {"images_per_s": (b[1] - a[1]) / dt, "mb_per_s": (b[2] - a[2]) / dt / 1e6}


# ---------------------------------------------------------------------------------------------
# data: base images (data.py), copies, two conversions, the shard folders
def prepare(workdir: str, images: int, copies: int) -> Dict[str, str]:
    """Build once (cached in ``workdir``): ``one/`` (one file), ``two/`` (2 shards +
    manifest), ``disk_a/`` and ``disk_b/`` (shard 0 and 1, hard links), ``manifest/`` (the
    manifest alone: its shards are found through ``shard_dirs``)."""
    sys.path.insert(0, HERE)
    import data as bench_data
    from imagenet_seq.convert.cli import main as preprocess
    from imagenet_seq.format import manifest

    paths = {k: os.path.join(workdir, k) for k in ("one", "two", "disk_a", "disk_b",
                                                   "manifest")}
    done = os.path.join(workdir, f"ready-{images}-{copies}")
    if os.path.exists(done):
        return paths
    for k in paths.values():
        shutil.rmtree(k, ignore_errors=True)
    base = bench_data.ensure(images, os.path.join(workdir, "base"), legacy=False)
    big = os.path.join(workdir, "big")
    shutil.rmtree(big, ignore_errors=True)
    print(f"copying {base.images} images x {copies} into {big} ...", flush=True)
    for c in sorted(os.listdir(base.train_dir)):
        os.makedirs(os.path.join(big, "train", c))
        for f in os.listdir(os.path.join(base.train_dir, c)):
            for k in range(copies):  # files of their own: the converter stores links once
                shutil.copyfile(os.path.join(base.train_dir, c, f),
                                os.path.join(big, "train", c, f"{k}_{f}"))
    for out, extra in ((paths["one"], []), (paths["two"], ["--shards", "2"])):
        print(f"converting into {out} {' '.join(extra)} ...", flush=True)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if preprocess([big, tmp, "--no-progress", "--splits", "train"] + extra) != 0:
            raise RuntimeError(f"preprocess into {tmp} failed")
        os.replace(tmp, out)
    shutil.rmtree(big)
    for j, disk in enumerate(("disk_a", "disk_b")):
        os.makedirs(paths[disk])
        name = manifest.shard_filename("train", j, 2)
        os.link(os.path.join(paths["two"], name), os.path.join(paths[disk], name))
    os.makedirs(paths["manifest"])
    shutil.copy(os.path.join(paths["two"], manifest.manifest_filename("train")),
                paths["manifest"])
    open(done, "w").close()
    return paths


def _warm(folder: str) -> None:
    """Read the backing files once (not timed): the emulator, not this machine's disk, then
    sets the pace."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(1 << 24):
                pass




def measure(name: str, layout: str, disks: int, paths: Dict[str, str], args,
            variant: dict) -> dict:
    """One row on fresh mounts (cold cache)."""
    import contextlib

    import slowfs

    sources = {"one": [paths["one"]], "two_disks": [paths["disk_a"], paths["disk_b"]],
               "two_one_disk": [paths["two"]]}[layout]
    mounts = [os.path.join(args.workdir, f"mnt{k}") for k in range(len(sources))]
    model = ["--mb-per-s", f"{args.mb_per_s:g}"]
    for src in sources:
        _warm(src)
    with contextlib.ExitStack() as stack:
        stats = [stack.enter_context(slowfs.mounted(src, mnt, "hdd", model))
                 for src, mnt in zip(sources, mounts)]
        if layout == "two_disks":
            cmd_root, dirs = paths["manifest"], ",".join(mounts)
        else:
            cmd_root, dirs = mounts[0], ""
        cmd = [sys.executable, os.path.abspath(__file__), "_measure", cmd_root,
               f"--shard-dirs={dirs}"] + variant["argv"]
        r = run_measurement(cmd, args.timeout)
    r.update(name=name, layout=layout, disks=disks, variant=variant["name"],
             device_stats=[dict(s) for s in stats])
    r["images_per_s"] = r["images"] / r["seconds"]
    r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
    r["middle"] = _middle_rate(r["samples"])
    # the mounts' busy time covers the Loader's construction too (metadata reads)
    r["utilisation"] = [s.get("busy_s", 0.0) / (r["seconds"] + r["make_s"])
                        for s in r["device_stats"]]
    print(f"  {variant['name']:9} {name:18} {r['images_per_s']:8.1f} img/s {r['mb_per_s']:7.1f} MB/s "
          f"(middle 80 %: {r['middle']['images_per_s']:.1f} img/s) readers "
          f"{len(r['devices'])}, disks busy "
          f"{', '.join(f'{u:.0%}' for u in r['utilisation'])}", flush=True)
    return r


IMAGENET_CHUNK_BYTES = 1024 * 110e3  # ImageNet's chunk: 1024 records of ~110 KB


def variants(args, mean_bytes: float) -> List[dict]:
    """The settings each layout is read with: the defaults; and (``scaled``) a chunk of
    ``--scaled-chunk`` records with the device window shrunk by the same factor relative to
    ImageNet's chunk, so that the window holds as many chunks as on ImageNet and is a small
    part of each shard (on a few-GB split the default window holds most of a shard)."""
    from imagenet_seq.read import readahead

    out = [dict(name="defaults", argv=[], chunk=None, window=readahead.DEVICE_AHEAD_BYTES)]
    if args.scaled_chunk:
        window = int(readahead.DEVICE_AHEAD_BYTES * args.scaled_chunk * mean_bytes
                     / IMAGENET_CHUNK_BYTES)
        out.append(dict(name="scaled", chunk=args.scaled_chunk, window=window,
                        argv=[f"--chunk-size={args.scaled_chunk}", f"--device-ahead={window}"]))
    return out


def report(rows: List[dict], setup: dict) -> str:
    """The Markdown table with the ratios against the one-file row of the same variant."""
    lines = ["# Multi-disk: one file on one HDD vs 2 shards on 2 HDDs vs 2 shards on 1 HDD",
             "", f"Command: `{setup['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "command"]
    lines += ["", "| settings | layout | readers | images/s | MB/s | x one file | middle 80 % "
              "images/s | x one file | disks busy | reader CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["layout"] == "one" and
                     b["variant"] == r["variant"]), None)
        x = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        xm = r["middle"]["images_per_s"] / base["middle"]["images_per_s"] if base else \
            float("nan")
        lines.append(f"| {r['variant']} (chunk {r['chunk']}, window "
                     f"{r['device_ahead_bytes'] / 2**20:.0f} MiB) | {r['name']} | "
                     f"{len(r['devices'])} | {r['images_per_s']:.0f} | {r['mb_per_s']:.1f} | "
                     f"{x:.2f} | {r['middle']['images_per_s']:.0f} | {xm:.2f} | "
                     f"{', '.join(f'{u:.0%}' for u in r['utilisation'])} | {r['cpu_s']:.1f} |")
    lines.append("")
    for what, value, ok in goals(rows):
        lines.append(f"- {what}: {value} ({'met' if ok else 'MISSED'})")
    return "\n".join(lines) + "\n"


def goals(rows: List[dict]):
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        by = {r["layout"]: r for r in rows if r["variant"] == variant}
        if "one" in by and "two_disks" in by:
            x = by["two_disks"]["images_per_s"] / by["one"]["images_per_s"]
            out.append((f"{variant}: 2 shards on 2 HDDs vs one file on 1 HDD (>= 1.8x)",
                        f"{x:.2f}x", x >= 1.8))
        if "one" in by and "two_one_disk" in by:
            x = by["two_one_disk"]["images_per_s"] / by["one"]["images_per_s"]
            out.append((f"{variant}: 2 shards on 1 HDD vs one file on 1 HDD (not slower: "
                        ">= 0.97x)", f"{x:.2f}x", x >= 0.97))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        return _measure_main(argv[1:])
    p = argparse.ArgumentParser(description="one vs two emulated HDDs (sharded split)")
    p.add_argument("--images", type=int, default=3000, help="distinct JPEGs (data.py)")
    p.add_argument("--copies", type=int, default=11,
                   help="copies of each in the split (11 x 3000 = 33,000 records: the "
                        "automatic chunk is 1024 records, as on ImageNet)")
    p.add_argument("--mb-per-s", type=float, default=150.0, help="each emulated HDD's rate")
    p.add_argument("--workdir", default="/tmp/imagenet_seq_multi_disk")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    p.add_argument("--scaled-chunk", type=int, default=128,
                   help="records per chunk of the 'scaled' rows (0: no scaled rows)")
    p.add_argument("--tiny", action="store_true",
                   help="a check that the script works: tiny data, slow disks")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    import slowfs

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        print(f"multi_disk: FUSE unavailable ({reason}); nothing measured", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    paths = prepare(args.workdir, args.images, args.copies)
    from imagenet_seq.read.reader import SplitReader

    meta = SplitReader(paths["one"], "train").meta
    load0 = os.getloadavg()
    setup = {"command": "python benchmarks/multi_disk.py " + " ".join(map(shlex.quote, argv)),
             "commit": _commit(),
             "machine": f"{os.cpu_count()} CPU cores, Linux {os.uname().release}; load average "
                        f"at start {' / '.join(f'{x:.2f}' for x in load0)} (1 / 5 / 15 min; "
                        "other jobs share the cores)",
             "data": f"{meta.num_records} records ({args.images} ImageNet-like JPEGs of "
                     f"benchmarks/data.py x {args.copies}), mean "
                     f"{meta.total_bytes / max(1, meta.num_records) / 1e3:.0f} KB, "
                     f"{meta.total_bytes / 1e9:.2f} GB",
             "emulated HDD": f"benchmarks/slowfs.py --device hdd: 8 ms seek + 4.17 ms rotation "
                             f"per non-contiguous request, {args.mb_per_s:g} MB/s",
             "each row": f"one train epoch on fresh mounts (cold cache), Loader(batch_size="
                         f"{BATCH}, buffer_size={BUFFER}, seed=0, automatic chunk), decode "
                         "replaced by a byte count (2 cores could not decode at two disks' rate)"}
    if args.tiny:
        setup["tiny"] = "a check that the script runs (tiny data, slow disks): not a measurement"
    mean = meta.total_bytes / max(1, meta.num_records)
    rows, failed = [], []
    try:
        for variant in variants(args, mean):
            for name, layout, disks in ROWS:
                try:
                    rows.append(measure(name, layout, disks, paths, args, variant))
                except RuntimeError as e:  # one broken row must not lose the others
                    print(f"  FAILED {variant['name']} {name}: {str(e)[-800:]}",
                          file=sys.stderr)
                    failed.append(f"{variant['name']} {name}: {str(e)[-400:]}")
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    if rows:
        setup["read-ahead"] = (f"{rows[0]['prefetch_bytes'] >> 20} MiB per reader with one "
                               "device; with several, the window per device in the table "
                               "(default: imagenet_seq.read.readahead.DEVICE_AHEAD_BYTES)")
        setup["settings"] = ("defaults: the Loader's automatic chunk and the default device "
                             "window; scaled: a smaller chunk and a window holding as many of "
                             "them as the default window holds ImageNet's 1024-record chunks "
                             "(~113 MB), a small part of each shard as on ImageNet")
    setup["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    setup["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(os.path.join(args.out, "multi_disk.json"), "w") as f:
        json.dump({"rows": rows, "setup": setup, "failed": failed,
                   "goals": [dict(goal=g, measured=v, met=ok) for g, v, ok in goals(rows)]},
                  f, indent=1)
    text = report(rows, setup)
    with open(os.path.join(args.out, "multi_disk.md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
