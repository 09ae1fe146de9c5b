"""Are ``imagenet-seq-bench --advise``'s predictions right? Predicted vs measured epoch time.

    flock /work/notes/bench.lock nice -n -10 python benchmarks/advise_check.py \
        [--images 3000] [--devices hdd nfs] [--epochs 3] [--workdir /tmp/imagenet_seq_advise]

For each emulated device (``benchmarks/slowfs.py``; HDD and NFS models at ``--hdd-mb-per-s`` /
``--nfs-mb-per-s``, scaled down so that, as for a real 150 MB/s disk in front of a many-core
machine, the disk and not this machine's 2 cores limits the original-size set), as a user would:

1. ImageNet-like photographs (``imagenet_seq.tools.sample``: real photos, 500x375, ~90 KB
   JPEGs), converted as is with ``imagenet-seq-preprocess``;
2. ``imagenet-seq-bench MOUNT --advise --json`` on a fresh mount of that set;
3. the set converted at the size the advice recommends, or, if it keeps the original, at
   ``--max-size 320 --quality 90`` (two sizes in all);
4. measured: the advised configuration (its size and workers) and one not advised (the other
   size, ``--workers`` threads), each on a fresh mount: ``--epochs`` epochs of the real Loader
   (``buffer_size`` as given to the advice, ``overlap_epochs=False``), the page cache
   dropped before each epoch, every epoch timed from its first read to its last batch.

Reports predicted vs measured seconds per epoch (goal: within +-15 %) in
``benchmarks/results/advise.md`` and ``advise.json``, with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
GOAL = 0.15


def _epochs_main(argv: List[str]) -> int:
    """Child: ``_epochs ROOT WORKERS WORKER_TYPE EPOCHS BUFFER BATCH`` -> ``RESULT {json}``."""
    root, workers, kind, epochs, buffer, batch = argv
    from imagenet_seq import format as fmt
    from imagenet_seq.data import Loader
    from imagenet_seq.read.evict import evict

    loader = Loader(root, "train", batch_size=int(batch), num_workers=int(workers),
                    worker_type=kind, buffer_size=int(buffer), overlap_epochs=False)
    path = fmt.find_split(root, "train")
    times, evicted = [], []
    for e in range(int(epochs)):
        loader.set_epoch(e)
        evicted.append(evict(path)[0])
        n, t0 = 0, time.monotonic()
        for images, _ in loader:
            n += len(images)
        times.append(time.monotonic() - t0)
    loader.close()
    print("RESULT " + json.dumps({"epoch_s": times, "images": n, "evicted": all(evicted)}))
    return 0


def _preprocess(src: str, dst: str, size: Optional[int]) -> str:
    if not os.path.exists(os.path.join(dst, "ILSVRC-train.lmdb")):
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [sys.executable, "-m", "imagenet_seq.convert.cli", src, dst, "--splits", "train",
               "--no-progress"] + (["--max-size", str(size), "--quality", "90"] if size else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    return dst


def _prepare(workdir: str, images: int) -> str:
    from imagenet_seq.tools.sample import make_sample_imagefolder

    src = os.path.join(workdir, f"src{images}")
    if not os.path.exists(src + ".done"):
        shutil.rmtree(src, ignore_errors=True)
        print(f"making {images} ImageNet-like JPEGs in {src} ...", flush=True)
        make_sample_imagefolder(src, train_per_class=images // 8, val_per_class=0,
                                num_classes=8, seed=0)
        open(src + ".done", "w").close()
    return src


def _predicted(rows: List[Dict], rec: Dict, size: Optional[int], workers: int,
               kind: str) -> Dict:
    """The advice's row for this configuration (the recommendation's own figures for it)."""
    if rec["max_size"] == size and rec["workers"] == workers and rec["worker_type"] == kind:
        return rec
    for r in rows:
        if r["max_size"] == size and r["workers"] == workers and r["worker_type"] == kind \
                and r["ranks"] == 1:
            return r
    raise LookupError(f"no row for size {size}, {workers} {kind} workers")


def check_device(device: str, args, src: str, asis: str) -> Dict:
    import slowfs
    from slow_disk import run_measurement

    model = ["--mb-per-s", str(getattr(args, f"{device}_mb_per_s"))]
    mnt = os.path.join(args.workdir, "mnt")
    load0 = os.getloadavg()
    common = ["--batch-size", str(args.batch), "--buffer-size", str(args.buffer),
              "--workers", str(args.workers), "--epochs", "90"]
    with slowfs.mounted(asis, mnt, device, model):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "imagenet_seq.tools.bench", mnt, "--advise",
                              "--json"] + common, capture_output=True, text=True, timeout=900)
        advise_s = time.monotonic() - t0
        text = subprocess.run([sys.executable, "-c", "import json,sys; from imagenet_seq.tools."
                               "advise_report import format_advice; print(format_advice("
                               "json.load(sys.stdin)))"], input=out.stdout,
                              capture_output=True, text=True, timeout=60).stdout
    if out.returncode != 0:
        raise RuntimeError(f"--advise failed on {device}: {out.stderr[-3000:]}")
    advice = json.loads(out.stdout)
    print(text.replace(mnt, f"<{device} mount>"), flush=True)
    rec = advice["recommendation"]
    other = 320 if rec["max_size"] is None else None
    sets = {None: asis}
    for size in {rec["max_size"], other} - {None}:
        sets[size] = _preprocess(src, os.path.join(args.workdir, f"lmdb_max{size}"), size)
    configs = [("advised", rec["max_size"], rec["workers"], rec["worker_type"]),
               ("not advised", other, args.workers, "thread")]
    results = []
    for label, size, w, kind in configs:
        pred = _predicted(advice["rows"], rec, size, w, kind)
        with slowfs.mounted(sets[size], mnt, device, model) as stats:
            m = run_measurement([sys.executable, os.path.abspath(__file__), "_epochs", mnt,
                                 str(w), kind, str(args.epochs), str(args.buffer),
                                 str(args.batch)], timeout=1800)
        measured = sorted(m["epoch_s"])[len(m["epoch_s"]) // 2]  # median epoch
        row = {"config": label, "max_size": size, "workers": w, "worker_type": kind,
               "predicted_epoch_s": pred["epoch_s"], "predicted_limit": pred["limit"],
               "predicted_disk_s": pred["disk_epoch_s"], "predicted_cpu_s": pred["cpu_epoch_s"],
               "measured_epoch_s": measured, "measured_epochs_s": m["epoch_s"],
               "error": pred["epoch_s"] / measured - 1, "page_cache_evicted": m["evicted"],
               "device_bytes": stats.get("bytes")}
        print(f"  {device} {label:12} {'as is' if size is None else f'max {size}':8} {w} {kind}"
              f": predicted {row['predicted_epoch_s']:.2f} s ({row['predicted_limit']}), "
              f"measured {measured:.2f} s (epochs {', '.join(f'{x:.2f}' for x in m['epoch_s'])})"
              f" -> {row['error']:+.1%}", flush=True)
        results.append(row)
    return {"device": device, "model_args": model, "advice_seconds": advise_s,
            "advice": advice, "advice_text": text.replace(mnt, f"<{device} mount>"),
            "results": results, "load_before": load0, "load_after": os.getloadavg(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def write_report(res: Dict, out: str) -> None:
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# `--advise` predictions checked: predicted vs measured epoch time", "",
             f"`{res['command']}`", "",
             f"{res['data']}. Each configuration on a fresh mount of the emulated device, "
             f"{res['epochs']} epochs of the real Loader (batch {res['batch']}, shuffle buffer "
             f"{res['buffer']} records, overlap_epochs=False), page cache dropped before each "
             "epoch; measured = the median epoch. Goal: within +-15 %.", "",
             "| device | config | set | workers | predicted epoch | limit (predicted) | "
             "measured epoch (each) | error |", "|---|---|---|---|---|---|---|---|"]
    for d in res["devices"]:
        for r in d["results"]:
            size = "as is" if r["max_size"] is None else f"--max-size {r['max_size']} -q 90"
            lines.append(
                f"| {d['device']} ({' '.join(d['model_args'])} MB/s) | {r['config']} | {size} | "
                f"{r['workers']} {r['worker_type']}{'s' if r['workers'] > 1 else ''} | "
                f"{r['predicted_epoch_s']:.2f} s | "
                f"{r['predicted_limit']} | {r['measured_epoch_s']:.2f} s ("
                + ", ".join(f"{x:.2f}" for x in r["measured_epochs_s"])
                + f") | {r['error']:+.1%}{'' if abs(r['error']) <= GOAL else ' (missed)'} |")
    for d in res["devices"]:
        lines += ["", f"## The advice on {d['device']} ({d['advice_seconds']:.0f} s; "
                  f"`{d['uptime']}` after the device's runs)", "", "```", d["advice_text"].rstrip(),
                  "```"]
    lines += ["", f"machine: {res['machine']}; commit {res['commit']}"]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_epochs":
        return _epochs_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--devices", nargs="+", default=["hdd", "nfs"], choices=["hdd", "nfs"])
    p.add_argument("--hdd-mb-per-s", type=float, default=30.0)
    p.add_argument("--nfs-mb-per-s", type=float, default=40.0)
    p.add_argument("--epochs", type=int, default=3, help="measured epochs per configuration")
    p.add_argument("--workers", type=int, default=2, help="decode workers of the advice")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buffer", type=int, default=512,
                   help="shuffle buffer (records): smaller than the split, as ImageNet's "
                        "default 2 GiB is (~1.5 %% of it), so reads and decode overlap")
    p.add_argument("--workdir", default="/tmp/imagenet_seq_advise")
    p.add_argument("--out", default=os.path.join(HERE, "results", "advise"))
    args = p.parse_args(argv)
    import slowfs
    from slow_disk import _commit

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        print(f"advise_check: FUSE unavailable ({reason}); nothing measured", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    src = _prepare(args.workdir, args.images)
    asis = _preprocess(src, os.path.join(args.workdir, "lmdb_asis"), None)
    from imagenet_seq.read.reader import SplitReader

    meta = SplitReader(asis, "train").meta
    res = {"command": "python benchmarks/advise_check.py " + " ".join(argv),
           "data": f"{meta.num_records} ImageNet-like JPEGs (real photographs, 500x375, mean "
                   f"{meta.total_bytes / meta.num_records / 1e3:.0f} KB)",
           "machine": f"{os.cpu_count()} CPU cores, Linux {os.uname().release}",
           "commit": _commit(), "epochs": args.epochs, "batch": args.batch,
           "buffer": args.buffer, "devices": []}
    for device in args.devices:
        res["devices"].append(check_device(device, args, src, asis))
        write_report(res, args.out)
    print(f"wrote {args.out}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
