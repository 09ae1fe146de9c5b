"""From what ``--advise`` measured to predicted hours per choice (the model role; no I/O).

One epoch of ``N`` records of ``b`` bytes, on a disk streaming ``D`` bytes/s with a far move
costing ``f`` s, decoded at ``C`` images/s, through a shuffle buffer of ``B`` records:

* disk: ``T_d = N b / D + chunks f`` (the epoch plan visits ``chunks`` contiguous chunks in a
  permuted order; ``f``, what one switch costs, is measured: the time an epoch's records
  took in plan order beyond the sequential stream, per chunk, the drive's reordering of
  queued read-ahead included; a val split is one forward pass);
* CPU: ``T_c = N / C``;
* epoch ``= max(T_d + B/C, B T_d / N + T_c)``: the first batch comes once the buffer holds
  ``B`` records; then reading and decoding overlap, and whichever is slower sets the pace, the
  other one's share of the buffer (read before decoding starts, or decoded after reading ends)
  added. A split that fits the buffer (``B >= N``) is read whole before it is decoded: the sum.
  The next epoch's fill starts once this epoch's buffer is empty (the Loader's
  ``overlap_epochs``), so every epoch pays its fill; the overlap with the last batches in
  flight is left out (a few batches).

Never faster than the device: every epoch is at least ``N b / D``, the disk's measured
sequential rate. Re-encoded sizes scale ``b`` by the bytes the sample re-encoded to and ``C``
by its decode rate; workers scale the measured pool rate by the cores they can use; ranks on
one machine share its cores and (through the node reader) the one sequential stream.
The GPU is not measured: every prediction assumes it keeps up (``gpu: unknown``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

__all__ = ["SAME_WITHIN", "FIDELITY_WORTH", "HEADROOM", "BATCH_BYTES_PER_IMAGE", "chunk_records",
           "switch_seconds", "epoch_seconds", "predict", "recommend"]

#: a re-encoded set must save more than this fraction of the run to be recommended over the
#: original pixels (other pixels than torchvision's of the originals are a real cost)
FIDELITY_WORTH = 0.25
#: among re-encoded sizes, and among worker counts, those within this fraction of the best
#: count as the best (the larger size, the fewer workers win)
SAME_WITHIN = 0.10
#: a disk-bound choice gets workers that decode at least this many times the disk's rate
HEADROOM = 1.5
BATCH_BYTES_PER_IMAGE = 224 * 224 * 3  # a decoded uint8 image in a batch
READ_AHEAD_BYTES = 64 << 20  # the reader's span read-ahead (imagenet_seq.read.readahead)
THREAD_WORKER_MB = 20.0  # a decode thread's own memory (its scratch images), estimated


def chunk_records(records: int, world_size: int = 1) -> int:
    """The epoch plan's automatic chunk (records per contiguous read)."""
    from imagenet_seq.plan import order

    return min(order.DEFAULT_CHUNK_RECORDS,
               max(1, records // (world_size * order.MIN_CHUNKS_PER_RANK)))


def epoch_seconds(records: int, record_bytes: float, disk_bytes_per_s: float,
                  far_move_s: float, cpu_images_per_s: float, buffer: int, chunks: int) -> Dict:
    """One epoch's disk, CPU and total seconds (module docstring), and what limits it."""
    n = records
    t_disk = n * record_bytes / disk_bytes_per_s + chunks * far_move_s
    t_cpu = n / cpu_images_per_s if cpu_images_per_s > 0 else math.inf
    b = min(max(buffer, 0), n)
    epoch = max(t_disk + b / cpu_images_per_s if cpu_images_per_s > 0 else math.inf,
                b * t_disk / n + t_cpu)
    floor = n * record_bytes / disk_bytes_per_s
    return {"epoch_s": max(epoch, floor), "disk_s": t_disk, "cpu_s": t_cpu,
            "device_floor_s": floor, "fill_s": b * t_disk / n,
            "limit": "disk" if t_disk >= t_cpu else "CPU"}


def _cpu_rate(cpu: Dict, workers: int, kind: str, cores: int) -> float:
    """Images/s of ``workers`` decode workers of ``kind``: the measured pool rate scaled by
    the cores they can use (more workers than cores add nothing)."""
    pool = cpu["threads" if kind == "thread" else "processes"]
    used = max(1, min(pool["workers"], cores))
    return pool["images_per_s"] * max(1, min(workers, cores)) / used


def _memory_gb(buffer: int, record_bytes: float, workers: int, kind: str, ranks: int,
               batch: int, worker_rss_mb: float) -> float:
    """The Loaders' own memory on the machine: shuffle buffers (compressed records),
    decoded batches in flight (``workers + 2`` per rank), read-ahead, worker processes."""
    per_rank = ((workers + 2) * batch * BATCH_BYTES_PER_IMAGE + READ_AHEAD_BYTES
                + workers * (worker_rss_mb if kind == "process" else THREAD_WORKER_MB) * 1e6)
    return (buffer * ranks * record_bytes + ranks * per_rank) / 1e9


def predict(m: Dict, records: int, mean_bytes: float, epochs: int, split: str,
            workers: int, world_size: int, batch: int,
            buffer_size: Optional[int] = None) -> List[Dict]:
    """The table's rows: stored as is / ``--max-size`` N (``workers`` threads, one rank), then
    decode workers and ranks on this disk for the set :func:`recommend` picks among sizes."""
    from imagenet_seq.plan.shuffle import buffer_records

    shuffled = split == "train"
    disk = m["disk"]["mb_per_s"] * 1e6
    far = switch_seconds(m, records, mean_bytes) if shuffled else 0.0
    cores = m["cpu"]["cpus"]
    rss = m["cpu"]["processes"].get("worker_rss_mb", 0.0) or 150.0
    source = m.get("source")

    def row(section: str, choice: str, size: Optional[int], w: int, kind: str,
            ranks: int) -> Dict:
        s = m["sizes"][str(size)] if size else None
        b = mean_bytes * (s["bytes_ratio"] if s else 1.0)
        c = _cpu_rate(m["cpu"], max(1, w // ranks) * ranks, kind, cores) * \
            (s["decode_ratio"] if s else 1.0)
        buf = buffer_records(buffer_size, None, b, ranks) if shuffled else 0
        chunks = math.ceil(records / chunk_records(records, ranks)) if shuffled else 1
        e = epoch_seconds(records, b, disk, far, c, buf * ranks, chunks)
        r = {"section": section, "choice": choice, "max_size": size,
             "quality": s["quality"] if s else None, "workers": w, "worker_type": kind,
             "ranks": ranks, "mean_record_kb": b / 1e3, "cpu_images_per_s": c,
             "disk_images_per_s": disk / b, "epoch_s": e["epoch_s"],
             "hours": e["epoch_s"] * epochs / 3600, "disk_epoch_s": e["disk_s"],
             "cpu_epoch_s": e["cpu_s"], "device_floor_s": e["device_floor_s"],
             "fill_s": e["fill_s"], "limit": e["limit"], "buffer_records": buf * ranks,
             "memory_gb": _memory_gb(min(buf, records), b, max(1, w // ranks), kind, ranks,
                                     batch, rss),
             "conversion_hours": None}
        if source and section == "size":
            r["conversion_hours"] = _conversion_hours(source, m["sizes"], size, b, disk,
                                                      cores)
        return r

    rows = [row("size", "stored as is", None, workers, "thread", 1)]
    rows += [row("size", f"--max-size {n} --quality {m['sizes'][str(n)]['quality']}", n,
                 workers, "thread", 1) for n in _sizes(m)]
    size = recommend(rows)["max_size"]
    on = "as is" if size is None else f"max {size}"
    counts = sorted({1, 2, 4, 8, 16, 32, 64, cores, workers} & set(range(1, cores + 1)) |
                    {workers})
    rows += [row("workers", f"{w} worker thread{'s' if w > 1 else ''} ({on})", size, w,
                 "thread", 1) for w in counts]
    rows.append(row("workers", f"{workers} worker process{'es' if workers > 1 else ''} "
                    f"({on})", size, workers, "process", 1))
    ranks = sorted({1, world_size} | {r for r in (2, 4, 8, 16, 32) if r < world_size})
    rows += [row("ranks", f"{r} rank{'s' if r > 1 else ''} ({on}, "
                 f"{max(1, cores // r)} worker{'s' if cores // r > 1 else ''} each)", size,
                 max(1, cores // r) * r, "thread", r) for r in ranks if world_size > 1]
    return rows


def switch_seconds(m: Dict, records: int, mean_bytes: float) -> float:
    """Seconds one chunk switch of the epoch plan costs: what reading an epoch in its plan
    order took beyond the sequential stream, per chunk (measured: the seeks the drive really
    made, its reordering of queued read-ahead included); the far-move probe's cost per chunk
    where that read was not measured."""
    plan = m.get("plan_read")
    if not plan or plan["mb_per_s"] <= 0:
        return m["far_move"]["far_move_ms"] / 1e3
    chunks = math.ceil(records / chunk_records(records))
    extra = records * mean_bytes * (1 / (plan["mb_per_s"] * 1e6) - 1 / (m["disk"]["mb_per_s"]
                                                                         * 1e6))
    return max(0.0, extra) / chunks


def _sizes(m: Dict) -> List[int]:
    return sorted((int(k) for k in m["sizes"] if k.isdigit()), reverse=True)


def _conversion_hours(source: Dict, sizes: Dict, size: Optional[int], out_bytes: float,
                      disk: float, cores: int) -> float:
    """Reading the source in on-disk order, validating / re-encoding on every core, and
    writing the output three times on ROOT's disk (sorted runs, their merge read, the
    final file) at its measured rate: the slowest of the three (they overlap)."""
    n = source["images"]
    read = source["total_gb"] * 1e9 / (source["mb_per_s"] * 1e6)
    cpu_ms = sizes[str(size)]["convert_cpu_ms"] if size else sizes["as_is"]["convert_cpu_ms"]
    cpu = n * cpu_ms / 1e3 / max(1, cores)
    write = 3 * n * out_bytes / disk
    return max(read, cpu, write) / 3600


def recommend(rows: List[Dict]) -> Dict:
    """The one choice to make: among sizes, the original pixels unless a re-encode saves
    more than :data:`FIDELITY_WORTH` of the run, else the largest size within
    :data:`SAME_WITHIN` of the fastest; among workers (for that set), the fewest within half
    :data:`SAME_WITHIN` of the best epoch that still decode :data:`HEADROOM` times faster
    than the disk reads where any does (threads before processes)."""
    sizes = [r for r in rows if r["section"] == "size"]
    best = min(r["hours"] for r in sizes)
    if sizes[0]["hours"] <= best / (1 - FIDELITY_WORTH):
        pick = sizes[0]
    else:  # larger sizes first
        pick = next(r for r in sizes[1:] if r["hours"] <= best * (1 + SAME_WITHIN))
    workers = [r for r in rows if r["section"] == "workers"]
    w = None
    if workers:
        fastest = min(r["epoch_s"] for r in workers)
        near = [r for r in workers if r["epoch_s"] <= fastest * (1 + SAME_WITHIN / 2)]
        # headroom: a loaded machine decodes slower than measured; keep the CPU well ahead
        roomy = [r for r in near if r["cpu_epoch_s"] * HEADROOM <= r["disk_epoch_s"]]
        w = min(roomy or near, key=lambda r: (r["workers"], r["worker_type"] != "thread"))
    out = dict(pick)
    if w is not None:
        out.update(workers=w["workers"], worker_type=w["worker_type"], epoch_s=w["epoch_s"],
                   hours=w["hours"], limit=w["limit"], memory_gb=w["memory_gb"])
    out["saves_hours"] = sizes[0]["hours"] - out["hours"]
    return out
