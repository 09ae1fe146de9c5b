"""A tar of a tree converted in one sweep (this tree) against listing it first, then reading
it (the converter at ``--listing-commit``): from ``convert_order``'s emulated HDD and from
page cache, same archive, same run.

    python benchmarks/one_sweep.py [--images 2000] [--workers 2] [--devices hdd,cache]

The archive is ``convert_order``'s ``imagenet.tar`` (train and val of ImageNet-like JPEGs).
Reported per run: wall seconds of the whole command (both splits), images/s, and from the
emulated HDD the bytes it served, its requests, its positionings ("seeks") and its busy time:
a listing pass shows up as a second pass over the archive's bytes (the kernel's readahead
reads the data between the headers) or as one positioning per header.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import convert_order as co  # noqa: E402
import slowfs  # noqa: E402


def measure(tree, src, out, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(tree, "preprocess_sequential.py"), src, out,
           "--workers", str(args.workers), "--no-progress", "--json",
           "--tmp", os.path.join(args.work, "tmp"), "--memory-mb", str(args.memory_mb)]
    os.makedirs(os.path.join(args.work, "tmp"), exist_ok=True)
    load = round(os.getloadavg()[0], 2)
    r = co.run(cmd, REPO, args.timeout)
    images = sum(s["images"] for s in r["json"].values())
    return {"images": images, "wall_s": round(r["wall_s"], 2),
            "img_per_s": round(images / r["wall_s"], 1), "load1_start": load,
            "load1_end": round(os.getloadavg()[0], 2),
            "peak_pss_mb": round(r["peak_pss_mb"], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--listing-commit", default="32fd520",
                   help="the converter that lists an archive before reading it")
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--devices", default="hdd,cache")
    p.add_argument("--work", default=os.path.join(REPO, "bench_out", "one_sweep"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=os.path.join(HERE, "results", "one_sweep.json"))
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    data = co.make_data(args.work, args.images)
    trees = {"listing+read": co.baseline_tree(args.work, args.listing_commit),
             "one sweep": REPO}
    rows = []
    for device in args.devices.split(","):
        for config, tree in trees.items():
            out = os.path.join(args.work, "out")
            if device == "cache":
                with open(os.path.join(data, "imagenet.tar"), "rb") as fh:
                    while fh.read(1 << 20):
                        pass
                row = measure(tree, os.path.join(data, "imagenet.tar"), out, args)
            else:
                reason = slowfs.fuse_unavailable_reason()
                if reason:
                    print(f"skip {device}: {reason}", file=sys.stderr)
                    break
                lay = os.path.join(args.work, "layout.json")
                with open(lay, "w") as f:
                    json.dump(co.layout(data), f)
                mnt = os.path.join(args.work, "mnt")
                with co.mounted(data, mnt, lay, device) as stats:
                    row = measure(tree, os.path.join(mnt, "imagenet.tar"), out, args)
                row.update(device_mb=round(stats.get("bytes", 0) / 1e6, 1),
                           requests=stats.get("requests"), seeks=stats.get("seeks", "-"),
                           device_busy_s=round(stats.get("busy_s", 0), 2))
            row.update(config=config, device=device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"images": args.images, "workers": args.workers, "cpus": os.cpu_count(),
           "archive_mb": round(os.path.getsize(os.path.join(data, "imagenet.tar")) / 1e6, 1),
           "listing_commit": args.listing_commit, "rows": rows,
           "command": "python benchmarks/one_sweep.py " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    cols = ["device", "config", "images", "wall_s", "img_per_s", "device_mb", "requests",
            "seeks", "device_busy_s", "load1_start", "load1_end", "peak_pss_mb"]
    print("  ".join(cols))
    for r in rows:
        print("  ".join(str(r.get(c, "-")) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
