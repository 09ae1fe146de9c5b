"""The Loader at 14 M records: construction time, per-rank memory, first-batch time (issue 26).

    python benchmarks/index_memory.py [--records 14000000] [--shards 7] [--ranks 1,8]
    python benchmarks/index_memory.py --tiny      # a check that the script runs (seconds)

Data, made without the converter (``tests/shard_files.py``'s writers, the format's own
``__meta__``, ``__labels__``, ``__crc__`` and ``__offsets__``): one tiny valid JPEG (~290
bytes) as every record, labels drawn from 21,841 classes (ImageNet-21k's count), written once
as a one-file split and once as ``--shards`` shards with a manifest, under ``--workdir``
(reused when it holds a split of the same size; removed at the end unless ``--keep``).
Records this small sit inside LMDB's leaf pages, so the offsets index marks them all -1 and
records are read through the B-tree; the index is still loaded, checked and held in full.

Each row starts ``W`` rank processes at once (``LOCAL_WORLD_SIZE=W``, rank and world size
given explicitly, ``node_reader=False``, ``num_workers=0``, batch 256), as torchrun would on
one node. Every rank builds its Loader, then -- once all have -- its memory is read; then every
rank takes its first batch, and its memory is read again. Memory is ``psutil``'s
``memory_full_info`` (USS: pages only this process maps; PSS: each page divided by the
processes mapping it) and ``/proc/self/smaps_rollup`` (anonymous memory: what no other process
can share, and what a page-cache view of the file never is), each as the increase over the
same process just before the Loader was made (interpreter, torch and imagenet_seq imported).
The shuffle buffer is ImageNet's default budget in records (2 GiB per node / 110 KB per
record = 19,500 records, split among the ranks), not the default for these tiny records
(2 GiB / 290 B = 7.4 M records): the index, not the buffer, is measured.

Times depend on the machine's load (the load average is reported); memory does not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLASSES = 21841
NODE_BUFFER_RECORDS = (2 << 30) // (110 << 10)
TINY = {"records": 20_000, "shards": 3, "ranks": "1,2"}


# -- data -----------------------------------------------------------------------------------
def tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 120, 200)).save(buf, "JPEG", quality=75, optimize=True)
    return buf.getvalue()


class Records:
    """The records' values made on the fly (``RECORD_HEADER`` + the one JPEG): a sequence
    ``tests/shard_files.py`` writes without holding 14 M bytes objects."""

    def __init__(self, labels, jpeg: bytes, start: int = 0, stop: int = -1):
        self.labels, self.jpeg = labels, jpeg
        self.start, self.stop = start, len(labels) if stop < 0 else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        from imagenet_seq import format as fmt

        if isinstance(i, slice):
            lo, hi, _ = i.indices(len(self))
            return Records(self.labels, self.jpeg, self.start + lo, self.start + hi)
        return fmt.encode_record(int(self.labels[self.start + i]), self.jpeg)

    def __iter__(self):
        from imagenet_seq import format as fmt

        pack, jpeg = fmt.RECORD_HEADER.pack, self.jpeg
        for label in self.labels[self.start:self.stop].tolist():
            yield pack(label) + jpeg


def make(workdir: str, records: int, shards: int) -> Dict[str, str]:
    """``workdir/one`` (one file) and ``workdir/shards`` (``shards`` shards + manifest)."""
    import numpy as np

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from shard_files import write_records_as_shards, write_shard

    from imagenet_seq import format as fmt

    stamp = os.path.join(workdir, "made.json")
    want = {"records": records, "shards": shards}
    roots = {"one": os.path.join(workdir, "one"), "shards": os.path.join(workdir, "shards")}
    if os.path.exists(stamp) and json.load(open(stamp)) == want:
        return roots
    shutil.rmtree(workdir, ignore_errors=True)
    for r in roots.values():
        os.makedirs(r)
    jpeg = tiny_jpeg()
    labels = np.random.default_rng(0).integers(0, CLASSES, records).astype("<i4")
    values = Records(labels, jpeg)
    meta = fmt.Metadata(split="train", classes=[f"n{c:08d}" for c in range(CLASSES)],
                        class_counts=np.bincount(labels, minlength=CLASSES).tolist(),
                        num_records=records, total_bytes=records * len(jpeg), order="random",
                        options={"benchmark": "index_memory"})
    t = time.monotonic()
    write_shard(os.path.join(roots["one"], fmt.split_filename("train")), meta, values, labels,
                None)
    print(f"made {records:,} records as one file in {time.monotonic() - t:.0f} s", flush=True)
    if shards:
        t = time.monotonic()
        write_records_as_shards(meta, values, labels, roots["shards"], shards,
                                split_id="index-memory")
        print(f"made them as {shards} shards in {time.monotonic() - t:.0f} s", flush=True)
    json.dump(want, open(stamp, "w"))
    return roots


# -- one rank ---------------------------------------------------------------------------------
def _memory() -> Dict[str, int]:
    import psutil

    info = psutil.Process().memory_full_info()
    out = {"rss": info.rss, "uss": info.uss, "pss": info.pss}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Anonymous", "Pss_Anon", "Pss_File"):
                out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def child(root: str, rank: int, world: int, buffer: int) -> None:
    """One rank: build, report, wait; first batch, report, wait (the parent paces all ranks)."""
    import torch  # noqa: F401 - imported before the baseline, as a training script has it

    from imagenet_seq.data import Loader

    def say(**kw):
        print(json.dumps(kw), flush=True)

    def wait():
        if sys.stdin.readline().strip() != "go":
            sys.exit(0)

    base = _memory()
    t = time.monotonic()
    loader = Loader(root, "train", rank=rank, world_size=world, node_reader=False,
                    num_workers=0, batch_size=256, buffer_size=buffer, stall_timeout=600)
    say(built_s=time.monotonic() - t)
    wait()  # every rank has built its Loader
    say(base=base, after_build=_memory())
    wait()
    t = time.monotonic()
    images, _ = next(iter(loader))
    say(first_batch_s=time.monotonic() - t, batch=list(images.shape))
    wait()  # every rank has its first batch
    say(after_batch=_memory())
    wait()
    loader.close()


def run_row(root: str, world: int, timeout: float) -> Dict:
    env = dict(os.environ, LOCAL_WORLD_SIZE=str(world), IMAGENET_SEQ_NODE_READER="0",
               PYTHONPATH=REPO)
    buffer = max(1, NODE_BUFFER_RECORDS // world)
    procs = [subprocess.Popen([sys.executable, __file__, "--child", root, str(r), str(world),
                               str(buffer)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for r in range(world)]
    deadline = time.monotonic() + timeout
    load = [os.getloadavg()[0]]
    try:
        def read() -> List[Dict]:
            out = []
            for p in procs:
                line = p.stdout.readline()
                if not line or time.monotonic() > deadline:
                    raise RuntimeError(f"a rank of {world} ended or took too long")
                out.append(json.loads(line))
            return out

        def go() -> None:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()

        built = read()  # every rank has built its Loader: memory is read now
        load.append(os.getloadavg()[0])
        go()
        built = [dict(a, **b) for a, b in zip(built, read())]
        go()
        batch = read()
        load.append(os.getloadavg()[0])
        go()
        batch = [dict(a, **b) for a, b in zip(batch, read())]
        go()
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ranks = []
    for b, f in zip(built, batch):
        row = {"built_s": b["built_s"], "first_batch_s": f["first_batch_s"]}
        for when, mem in (("build", b["after_build"]), ("batch", f["after_batch"])):
            for k, v in mem.items():
                row[f"{k}_{when}"] = v - b["base"][k]
        ranks.append(row)
    return {"world": world, "buffer_records": buffer, "load": load, "ranks": ranks}


def summary(layout: str, records: int, row: Dict) -> str:
    mb = 1 << 20
    rs = row["ranks"]

    def worst(k):
        return max(r[k] for r in rs)

    return (f"| {layout} | {records:,} | {row['world']} | {worst('built_s'):.2f} | "
            f"{worst('uss_build') / mb:,.0f} | {worst('anonymous_build') / mb:,.0f} | "
            f"{worst('uss_batch') / mb:,.0f} | {worst('pss_batch') / mb:,.0f} | "
            f"{worst('anonymous_batch') / mb:,.0f} | {worst('first_batch_s'):.2f} | "
            f"{' / '.join(f'{x:.1f}' for x in row['load'])} |")


HEADER = ("| split | records | ranks | construction s (slowest rank) | USS MB after "
          "construction | anon MB after construction | USS MB after 1st batch | PSS MB after "
          "1st batch | anon MB after 1st batch | 1st batch s | load avg (start / built / "
          "batch) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=14_000_000)
    p.add_argument("--shards", type=int, default=7, help="also as this many shards (0: not)")
    p.add_argument("--ranks", default="1,8", help="rank counts, one row each")
    p.add_argument("--workdir", default="/tmp/imagenet_seq_index_memory")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--keep", action="store_true", help="keep the data for the next run")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    p.add_argument("--tiny", action="store_true", help="a check that the script runs")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        root, rank, world, buffer = args.child
        child(root, int(rank), int(world), int(buffer))
        return 0
    if args.tiny:
        for k, v in TINY.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    sys.path.insert(0, REPO)
    roots = make(args.workdir, args.records, args.shards)
    rows = []
    print(HEADER, flush=True)
    try:
        for layout in ("one", "shards") if args.shards else ("one",):
            for world in (int(w) for w in args.ranks.split(",")):
                row = run_row(roots[layout], world, args.timeout)
                row["layout"] = layout if layout == "one" else f"{args.shards} shards"
                row["records"] = args.records
                rows.append(row)
                print(summary(row["layout"], args.records, row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
