"""The converter's memory at ImageNet-21k's image count: the process tree's peak against
``--memory-mb`` (issue 26, item 7, converter side).

    python benchmarks/convert_memory.py                       # 14,000,000 images as one tar
    python benchmarks/convert_memory.py --images 1281167 --memory-mb 2000,1000
    python benchmarks/convert_memory.py --form wds --images 1281167
    python benchmarks/convert_memory.py --images 2000 --memory-mb 400 --workers 1  # seconds

Data (made once under ``--workdir``, reused by a later run asking for the same; this run's
data removed at the end unless ``--keep``): ``--images`` small synthetic JPEGs (16x16, one of
a pool of 4,096 distinct images, ~300 bytes: a tar member takes 1 KiB; the converter validates
each and does not dedupe) under distinct names, ``--classes`` classes (default: 1,000 up to
ImageNet-1k's 1,281,167 images, else ImageNet-21k's 21,841), written by a streaming writer
that keeps no member list:

  * ``--form tar``: one tar of a tree, ``train/<wnid>/<wnid>_<k>.JPEG`` class after class
    (as an extracted ImageNet re-tarred), converted with ``--splits train``;
  * ``--form wds``: WebDataset shards ``synth-train-NNNNNN.tar`` of ``--shard-images`` groups
    ``<wnid>_<k>.jpg`` + ``<wnid>_<k>.cls``, classes interleaved (as timm's shuffled shards);
  * ``--form folder``: the tree itself, one file per image (a 4 KiB block each on most file
    systems: for a few hundred thousand images, to see what a folder's scan adds per image).

Each ``--memory-mb`` value is one run of the real CLI (``preprocess_sequential.py SRC DST
--splits train --memory-mb M --workers W --json``). Every ``--interval`` seconds the sampler
reads ``/proc/PID/smaps_rollup`` of the converter and all its descendants and sums them:
``Pss_Anon`` (anonymous memory, each page divided among the processes sharing it: what the
bound is about; the workers are forked and share their parent's pages until written),
``Pss`` (the same plus mapped files: LMDB's map, libraries) and ``Anonymous`` (summed as if
nothing were shared). Reported per phase (``start``: interpreter, imports, the input's scan;
``read``: pass 1; ``merge``: pass 2; phases from the converter's progress bars): the peak of the
summed ``Pss_Anon`` and of the main process's own, with the processes at that peak; plus wall
time, images/s over the whole command and each pass's seconds from the converter's summary.
The load average (``uptime``) is recorded at the start and end of each run: memory does not
depend on it, times do.

Output: a table on stdout; ``--json FILE`` merges the rows into FILE (a row per form, image
count, --memory-mb and workers: a later run replaces its own row only), ``--md FILE`` writes
the markdown table of every row in the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IMAGENET_1K = 1_281_167
CLASSES_21K = 21_841
POOL = 4096
BLOCK = 512
_PHASE = re.compile(rb"train (read|merge)")


# -- data -------------------------------------------------------------------------------------
def jpeg_pool(n: int = POOL) -> List[bytes]:
    """``n`` distinct valid 16x16 JPEGs (a colour each, a small gradient; optimised Huffman
    tables: ~300 bytes, so a tar member is one header block and one data block)."""
    import io

    import numpy as np
    from PIL import Image

    out, ramp = [], np.arange(16, dtype=np.uint8)[:, None] * 4
    for i in range(n):
        px = np.empty((16, 16, 3), np.uint8)
        px[..., 0] = (i * 37) % 192 + ramp
        px[..., 1] = (i * 101 // 7) % 192 + ramp.T
        px[..., 2] = (i // 16) % 192 + 32
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=70, optimize=True)  # < 512 bytes
        out.append(buf.getvalue())
    return out


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def tar_header(name: str, size: int, mtime: int = 1_700_000_000) -> bytes:
    """A ustar header of a regular file (what ``tarfile`` writes, without its member list:
    ``TarFile.addfile`` keeps every TarInfo, ~0.5 KB each, 7 GB at 14 M members)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes (ustar without prefix)")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _member(name: str, data: bytes) -> bytes:
    return tar_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def class_names(classes: int) -> List[str]:
    return [f"n{c:08d}" for c in range(classes)]


def per_class(images: int, classes: int) -> List[int]:
    base, extra = divmod(images, classes)
    return [base + (c < extra) for c in range(classes)]


def _tree_members(images: int, classes: int, pool: List[bytes]) -> Iterator[bytes]:
    i = 0
    for wnid, n in zip(class_names(classes), per_class(images, classes)):
        for k in range(n):
            yield _member(f"train/{wnid}/{wnid}_{k}.JPEG", pool[i % len(pool)])
            i += 1


def _write(path: str, members: Iterator[bytes]) -> int:
    """Members -> ``path`` (through ``path.tmp``, renamed when whole); returns its bytes."""
    n = 0
    with open(path + ".tmp", "wb", buffering=8 << 20) as f:
        for m in members:
            f.write(m)
            n += len(m)
        f.write(b"\0" * (2 * BLOCK))
    os.replace(path + ".tmp", path)
    return n + 2 * BLOCK


def make_tar(folder: str, images: int, classes: int, pool: List[bytes]) -> str:
    path = os.path.join(folder, "synth.tar")
    _write(path, _tree_members(images, classes, pool))
    return path


def make_wds(folder: str, images: int, classes: int, pool: List[bytes],
             shard_images: int) -> str:
    """Shards of ``shard_images`` groups each; image i is of class i % classes."""
    shards = os.path.join(folder, "shards")
    os.makedirs(shards, exist_ok=True)
    names = class_names(classes)
    for j, first in enumerate(range(0, images, shard_images)):
        def members(first=first):
            for i in range(first, min(images, first + shard_images)):
                c, k = i % classes, i // classes
                key = f"{names[c]}_{k}"
                yield _member(key + ".jpg", pool[i % len(pool)])
                yield _member(key + ".cls", str(c).encode())
        _write(os.path.join(shards, f"synth-train-{j:06d}.tar"), members())
    return shards


def make_folder(folder: str, images: int, classes: int, pool: List[bytes]) -> str:
    root = os.path.join(folder, "tree")
    i = 0
    for wnid, n in zip(class_names(classes), per_class(images, classes)):
        d = os.path.join(root, "train", wnid)
        os.makedirs(d)
        for k in range(n):
            with open(os.path.join(d, f"{wnid}_{k}.JPEG"), "wb") as f:
                f.write(pool[i % len(pool)])
            i += 1
    return root


def data_bytes(form: str, images: int, pool: List[bytes]) -> int:
    """Bytes the data will take (tar headers and padding included; a file: one 4 KiB block)."""
    if form == "folder":
        return images * 4096
    mean = sum(BLOCK + -(-len(p) // BLOCK) * BLOCK for p in pool) / len(pool)
    return int(images * (mean + (2 * BLOCK if form == "wds" else 0)))


def ensure_data(workdir: str, form: str, images: int, classes: int, shard_images: int) -> str:
    """The source for ``form`` under ``workdir`` (made unless a stamp says it is there)."""
    folder = os.path.join(workdir, f"{form}_{images}_{classes}")
    stamp = os.path.join(folder, "made.json")
    want = {"form": form, "images": images, "classes": classes, "pool": [POOL, "optimized"],
            "shard_images": shard_images if form == "wds" else None}
    src = os.path.join(folder, {"tar": "synth.tar", "wds": "shards", "folder": "tree"}[form])
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return src
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    pool = jpeg_pool()
    need = data_bytes(form, images, pool)
    free = shutil.disk_usage(folder).free
    out = images * 2 * (sum(map(len, pool)) // len(pool) + 64)  # runs + the LMDB, roughly
    if need + out > free:
        raise SystemExit(f"{folder}: the data needs ~{need / 1e9:.1f} GB and the conversion "
                         f"~{out / 1e9:.1f} GB more, {free / 1e9:.1f} GB free; pass --workdir "
                         "on a disk with room or fewer --images")
    t = time.monotonic()
    print(f"making {images:,} images ({classes:,} classes) as {form}: ~{need / 1e9:.1f} GB "
          f"in {folder}", flush=True)
    if form == "tar":
        make_tar(folder, images, classes, pool)
    elif form == "folder":
        make_folder(folder, images, classes, pool)
    else:
        make_wds(folder, images, classes, pool, shard_images)
    os.sync()
    with open(stamp, "w") as f:
        json.dump(want, f)
    print(f"made in {time.monotonic() - t:.0f} s", flush=True)
    return src


# -- memory of a process tree -----------------------------------------------------------------
FIELDS = ("Pss", "Pss_Anon", "Anonymous")


def rollup(pid: int) -> Optional[Dict[str, int]]:
    """``FIELDS`` of ``/proc/pid/smaps_rollup`` in bytes; None once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if len(out) == len(FIELDS) else None


def tree(pid: int) -> List[int]:
    """``pid`` and all its descendants."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class Sampler:
    """Samples the tree of ``pid`` every ``interval`` s in a thread; ``phase`` is set by the
    caller. Keeps, per phase, the sample with the largest summed Pss_Anon (with its processes)
    and the largest main-process Pss_Anon."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.phase = "start"
        self.peaks: Dict[str, dict] = {}
        self.samples = 0
        self._lock = threading.Lock()  # the phase switch samples from the stderr reader's thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with self._lock:
            self._sample(self.phase)  # the phase when the sample began: a sample read across
                                      # a switch counts for the phase before it

    def _sample(self, phase: str) -> None:
        procs = {}
        for p in tree(self.pid):
            r = rollup(p)
            if r is not None:
                procs[p] = r
        if self.pid not in procs:
            return
        self.samples += 1
        total = {k: sum(r[k] for r in procs.values()) for k in FIELDS}
        peak = self.peaks.setdefault(phase, {"pss_anon": -1, "main_pss_anon": -1})
        if total["Pss_Anon"] > peak["pss_anon"]:
            peak.update(pss_anon=total["Pss_Anon"], pss=total["Pss"],
                        anonymous=total["Anonymous"], processes=len(procs),
                        at_peak={("main" if p == self.pid else f"child {p}"): r["Pss_Anon"]
                                 for p, r in procs.items()})
        peak["main_pss_anon"] = max(peak["main_pss_anon"], procs[self.pid]["Pss_Anon"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def checkout(tree: str) -> str:
    """The commit of the converter's checkout ``tree``, ``+dirty`` if its package differs."""
    def git(*a):
        return subprocess.run(["git", "-C", tree, *a], capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "imagenet_seq").strip()
                   else "")


def convert(src: str, out: str, memory_mb: int, workers: int, interval: float,
            timeout: float, tree_dir: str = REPO) -> dict:
    """One run of the CLI of the checkout ``tree_dir`` (its ``imagenet_seq`` first on the
    path), sampled; the row's measurements."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(tree_dir, "preprocess_sequential.py"), src, out,
           "--splits", "train", "--memory-mb", str(memory_mb), "--workers", str(workers),
           "--json"]
    load0 = _loadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=tree_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = Sampler(p.pid, interval)
    tail, head = bytearray(), bytearray()
    starts: Dict[str, float] = {}

    def read_err():
        for chunk in iter(lambda: p.stderr.read1(1 << 16), b""):
            if len(head) < 20000:
                head.extend(chunk[:20000])
            tail.extend(chunk)
            del tail[:-20000]
            for m in _PHASE.finditer(chunk):
                phase = m.group(1).decode()
                if phase not in starts:
                    sampler.sample()  # the last of the phase before, then switch
                    starts[phase] = time.perf_counter() - t0
                    with sampler._lock:
                        sampler.phase = phase
                    sampler.sample()  # a short phase gets one sample at least
    out_parts: List[bytes] = []
    readers = [threading.Thread(target=read_err, daemon=True),
               threading.Thread(target=lambda: out_parts.append(p.stdout.read()), daemon=True)]
    for t in readers:  # each pipe read by one thread only (communicate() would race them)
        t.start()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise SystemExit(f"the conversion ran past --timeout {timeout:.0f} s; pass fewer "
                         "--images or a longer --timeout")
    finally:
        sampler.stop()
        for t in readers:
            t.join(5)
    stdout = b"".join(out_parts)
    wall = time.perf_counter() - t0
    err = bytes(tail).decode("utf-8", "replace")
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])["train"]
    notice = next((line for line in head.decode("utf-8", "replace").replace("\r", "\n")
                   .splitlines() if "buffers <=" in line), "")
    shutil.rmtree(out, ignore_errors=True)
    return {"memory_mb": memory_mb, "workers": workers, "wall_s": round(wall, 1),
            "images_written": summary["images"], "img_per_s": round(summary["images"] / wall),
            "read_s": summary["read_seconds"], "merge_s": summary["merge_seconds"],
            "runs": summary["runs"], "tmp_bytes": summary["tmp_bytes"],
            "phase_start_s": {k: round(v, 1) for k, v in starts.items()},
            "peaks": sampler.peaks, "samples": sampler.samples, "interval_s": interval,
            "load_start": load0, "load_end": _loadavg(), "notice": notice,
            "commit": checkout(tree_dir),
            "command": " ".join(os.path.relpath(c, tree_dir) if c.startswith(tree_dir) else c
                                for c in cmd[1:])}


# -- report -----------------------------------------------------------------------------------
def _mb(x) -> str:
    return f"{x / 1e6:,.0f}" if isinstance(x, (int, float)) and x >= 0 else "-"


def peak_of(row: dict) -> Tuple[int, str]:
    """(largest summed Pss_Anon over the run, its phase)."""
    best = max(row["peaks"].items(), key=lambda kv: kv[1]["pss_anon"])
    return best[1]["pss_anon"], best[0]


def table(rows: List[dict]) -> str:
    head = ("| form | images | classes | --memory-mb | workers | peak MB (phase) | start MB | "
            "read MB | merge MB | main process MB | peak / bound | wall s | img/s | read s | "
            "merge s | runs | load start/end | converter |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["form"], r["images"], -r["memory_mb"])):
        peak, phase = peak_of(r)
        by = {ph: r["peaks"].get(ph, {}).get("pss_anon", -1) for ph in ("start", "read", "merge")}
        main = max(p["main_pss_anon"] for p in r["peaks"].values())
        lines.append(
            f"| {r['form']} | {r['images']:,} | {r['classes']:,} | {r['memory_mb']} | "
            f"{r['workers']} | {_mb(peak)} ({phase}) | {_mb(by['start'])} | {_mb(by['read'])} | "
            f"{_mb(by['merge'])} | {_mb(main)} | {peak / (r['memory_mb'] * 1e6):.2f} | "
            f"{r['wall_s']:,.0f} | {r['img_per_s']:,} | {r['read_s']:,.0f} | "
            f"{r['merge_s']:,.0f} | {r['runs']} | {r['load_start'][0]}/{r['load_end'][0]} | "
            f"{r.get('commit', '?')} |")
    return "\n".join(lines)


def markdown(rows: List[dict]) -> str:
    cmds = sorted({f"python benchmarks/convert_memory.py --form {r['form']} --images "
                   f"{r['images']} --memory-mb {r['memory_mb']} --workers {r['workers']}  "
                   f"# converter at {r.get('commit', '?')}" for r in rows})
    return ("Peak anonymous memory of the converter's process tree (sum of `Pss_Anon` over "
            "the main process and its workers, sampled every "
            f"{rows[0]['interval_s'] if rows else 0.5} s), in MB (10^6 bytes), against "
            "`--memory-mb`:\n\n" + table(rows) + "\n\nCommands:\n\n"
            + "\n".join(f"    {c}" for c in cmds) + "\n")


def merge_rows(path: str, new: List[dict]) -> List[dict]:
    """The rows of ``path`` with ``new`` replacing those of the same configuration."""
    rows: List[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    key = lambda r: (r["form"], r["images"], r["classes"], r["memory_mb"], r["workers"])  # noqa
    keys = {key(r) for r in new}
    return [r for r in rows if key(r) not in keys] + new


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=14_000_000)
    p.add_argument("--classes", type=int, default=None,
                   help=f"default: 1,000 up to {IMAGENET_1K:,} images, else {CLASSES_21K:,}")
    p.add_argument("--form", choices=["tar", "wds", "folder"], default="tar")
    p.add_argument("--shard-images", type=int, default=10_000, help="wds: images per shard")
    p.add_argument("--memory-mb", default="2000,1000", help="comma-separated; a run each")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tree", default=REPO,
                   help="the checkout whose converter runs (default: this one; e.g. a "
                        "`git worktree` of a commit)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--workdir", default="/tmp/imagenet_seq_convert_memory")
    p.add_argument("--keep", action="store_true", help="keep the data for the next run")
    p.add_argument("--make-only", action="store_true", help="make the data, convert nothing")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per conversion")
    p.add_argument("--json", default=None, help="merge the rows into this file")
    p.add_argument("--md", default=None, help="write the markdown table of --json's rows here")
    p.add_argument("--report-only", action="store_true",
                   help="convert nothing: print (and --md) the table of --json's rows")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images {args.images}; expected 1 or more")
    classes = args.classes or (1000 if args.images <= IMAGENET_1K else CLASSES_21K)
    classes = min(classes, args.images)
    memories = [int(m) for m in args.memory_mb.split(",") if m.strip()]
    if args.report_only:
        if not args.json or not os.path.exists(args.json):
            p.error("--report-only needs --json FILE with rows")
        with open(args.json) as f:
            rows = json.load(f)
        print(table(rows))
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    try:
        src = ensure_data(args.workdir, args.form, args.images, classes, args.shard_images)
        if args.make_only:
            args.keep = True
            return 0
        rows = []
        for m in memories:
            print(f"converting {args.images:,} images ({args.form}) with --memory-mb {m}, "
                  f"--workers {args.workers} ...", flush=True)
            row = convert(src, os.path.join(args.workdir, "out"), m, args.workers,
                          args.interval, args.timeout, os.path.abspath(args.tree))
            row.update(form=args.form, images=args.images, classes=classes)
            rows.append(row)
            peak, phase = peak_of(row)
            print(f"  peak {_mb(peak)} MB ({phase}) against {m} MB; {row['wall_s']:.0f} s, "
                  f"{row['img_per_s']:,} img/s; load {row['load_start']} -> "
                  f"{row['load_end']}", flush=True)
    finally:
        if not args.keep:  # this run's data (others' in --workdir stay), then the folder if empty
            shutil.rmtree(os.path.join(args.workdir, f"{args.form}_{args.images}_{classes}"),
                          ignore_errors=True)
            shutil.rmtree(os.path.join(args.workdir, "out"), ignore_errors=True)
            try:
                os.rmdir(args.workdir)
            except OSError:
                pass
    print(table(rows))
    if args.json:
        rows = merge_rows(args.json, rows)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
