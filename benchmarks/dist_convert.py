"""The converter as a torchrun job on M = 1, 2, 4 processes of this machine, reading emulated
slow storage (issue 27): what scaling out buys, and where the storage caps it.

    python benchmarks/dist_convert.py [--images 1200] [--procs 1,2,4] [--hdd-mb-per-s 10]
                                      [--nfs-mb-per-s 15] [--md benchmarks/results/dist_convert.md]

Two set-ups, each a folder tree of ImageNet-like JPEGs (``convert_order.make_data``) converted
into 4 shards (so every process merges) on the local disk:

* ``own disk``: each process ("node") reads its own emulated HDD (a FUSE mount of the same
  tree per process, ``slowfs``'s HDD model over the files' creation-order layout, a seek per
  positioning): a cluster whose nodes read separate disks (local replicas, the targets of a
  parallel filesystem);
* ``one NFS share``: every process reads the same emulated 1 GbE NFS mount, its bandwidth set
  low (``--nfs-mb-per-s``): a cluster whose nodes share one file server.

Rates are set low (default 10 MB/s per HDD, 15 MB/s for the share) so that the emulated storage,
not this machine's 2 cores, is the limit at up to 4 processes; the CPU's own limit is measured
too (the tree from page cache). Reported per row: the conversion's seconds (rank 0, from the
split's start to its manifest, every barrier included) and its images/s and speed-up against
one process of the same set-up; the whole torchrun command's seconds too (it adds torchrun's
start, torch's import and the process group's set-up: ~5-10 s here, once per job); the bytes
each emulated device served.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import convert_order as co  # noqa: E402
import slowfs  # noqa: E402

RUNNER = """
import os, sys
srcs = os.environ.get("BENCH_SRCS")
if srcs:  # each rank its own mount of the same tree
    sys.argv[1] = srcs.split(",")[int(os.environ.get("RANK", "0"))]
from imagenet_seq.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(argv: List[str]) -> int:
    """Child: ``convert_order.serve`` with the device's rate set (HDD on the files' layout,
    or NFS)."""
    source, mnt, layout_path, stats_path, device, rate = argv
    if device == "hdd":
        co.make_model = lambda d, base: co.LayoutHDD(base, mb_per_s=float(rate))
    else:
        co.make_model = lambda d, base: slowfs.NFSModel(mb_per_s=float(rate))
    return co.serve(source, mnt, layout_path, stats_path, device)


def mounted(source, mnt, layout_path, device, rate):
    stats = mnt.rstrip("/") + ".stats.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", source, mnt, layout_path,
           stats, device, str(rate)]
    return slowfs.serving(cmd, mnt, stats)


def convert(runner: str, procs: int, srcs: List[str], out: str, work: str,
            timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, BENCH_SRCS=",".join(srcs), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", runner, srcs[0], out, "--splits", "train",
           "--shards", "4", "--workers", "0", "--json", "--no-progress",
           "--tmp", os.path.join(work, "tmp"), "--memory-mb", "512"]
    os.makedirs(os.path.join(work, "tmp"), exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr[-3000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])["train"]
    # the conversion itself (rank 0: from the split's start to its manifest, every barrier
    # included) and the whole command (torchrun, torch's import, the process group)
    return {"wall_s": round(wall, 2), "convert_s": got["seconds"], "images": got["images"],
            "img_per_s": round(got["images"] / got["seconds"], 1),
            "wall_img_per_s": round(got["images"] / wall, 1), "load1_start": round(load, 2),
            "load1_end": round(os.getloadavg()[0], 2), "ranks": got.get("ranks")}


def _drop(path: str) -> None:
    """The tree's page cache dropped (the emulator reads the backing files: a warm cache
    would only hide the emulator's own cost, the model's timing is charged either way)."""
    from imagenet_seq.read.evict import evict
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    evict(files)


def run_setup(name: str, device: str, rate: float, procs: int, data: str, runner: str,
              args) -> dict:
    tree = os.path.join(data, "tree")
    layout_path = os.path.join(args.work, "layout.json")
    if not os.path.exists(layout_path):
        with open(layout_path, "w") as f:
            json.dump(co.layout(tree), f)
    out = os.path.join(args.work, "out")
    with contextlib.ExitStack() as stack:
        if device == "cache":
            srcs, stats = [tree] * procs, []
        else:
            n = procs if device == "hdd" else 1
            mnts = [os.path.join(args.work, f"mnt{k}") for k in range(n)]
            stats = [stack.enter_context(mounted(tree, m, layout_path, device, rate))
                     for m in mnts]
            srcs = mnts if device == "hdd" else mnts * procs
        r = convert(runner, procs, srcs, out, args.work, args.timeout)
    r.update(setup=name, device=device, procs=procs, mb_per_s=rate,
             devices=[{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}
                      for s in stats])
    print(f"  {name:14} procs={procs}  convert {r['convert_s']:7.1f} s  {r['img_per_s']:7.1f} "
          f"img/s  (command {r['wall_s']:.1f} s)  load {r['load1_start']}", flush=True)
    return r


def markdown(rows, args) -> str:
    lines = [f"`python benchmarks/dist_convert.py --images {args.images} --procs {args.procs} "
             f"--hdd-mb-per-s {args.hdd_mb_per_s:g} --nfs-mb-per-s {args.nfs_mb_per_s:g}` "
             f"({rows[0]['images']} train images, 4 shards, --workers 0 per process, this "
             f"machine: {os.cpu_count()} cores)", "",
             "| set-up | processes | conversion s | img/s | speed-up vs 1 | whole command s "
             "| its speed-up | MB read per device | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    base, wbase = {}, {}
    for r in rows:
        base.setdefault(r["setup"], r["img_per_s"])
        wbase.setdefault(r["setup"], r["wall_img_per_s"])
        mb = ", ".join(f"{d.get('bytes', 0) / 1e6:.0f}" for d in r["devices"]) or "-"
        lines.append(f"| {r['setup']} | {r['procs']} | {r['convert_s']:.1f} | "
                     f"{r['img_per_s']:.0f} | {r['img_per_s'] / base[r['setup']]:.2f}x | "
                     f"{r['wall_s']:.1f} | {r['wall_img_per_s'] / wbase[r['setup']]:.2f}x | "
                     f"{mb} | {r['load1_start']}-{r['load1_end']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return _serve(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--setups", default="cache,hdd,nfs",
                   help="cache (page cache: the CPU's limit), hdd (own disk per process), "
                        "nfs (one share)")
    p.add_argument("--hdd-mb-per-s", type=float, default=10.0)
    p.add_argument("--nfs-mb-per-s", type=float, default=15.0)
    p.add_argument("--work", default=os.path.join(REPO, "bench_out", "dist_convert"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=os.path.join(HERE, "results", "dist_convert.json"))
    p.add_argument("--md", help="also write the table as Markdown here")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    data = co.make_data(args.work, args.images)
    runner = os.path.join(args.work, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    names = {"cache": "page cache", "hdd": "own disk", "nfs": "one NFS share"}
    rates = {"cache": 0.0, "hdd": args.hdd_mb_per_s, "nfs": args.nfs_mb_per_s}
    rows = []
    for setup in args.setups.split(","):
        for procs in [int(x) for x in args.procs.split(",")]:
            if setup != "cache":
                _drop(os.path.join(data, "tree"))
            rows.append(run_setup(names[setup], setup, rates[setup], procs, data, runner, args))
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
    md = markdown(rows, args)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
