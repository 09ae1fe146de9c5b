"""What ``imagenet-seq-bench`` prints: the table a person reads and the optional bar chart."""
from __future__ import annotations

import os
from typing import Dict, List

from imagenet_seq.tools.bench_ranks import HOWS, LABELS, SAME_WITHIN

__all__ = ["DISK_BOUND_FRACTION", "MIN_STEADY_IMAGES", "judge_limit", "format_table", "write_plot"]

# the pipeline counts as disk-bound while it keeps this fraction of the raw stream's rate
DISK_BOUND_FRACTION = 0.8
# the pipeline's steady window must hold this many images to judge the limiting stage
MIN_STEADY_IMAGES = 200


def judge_limit(result: Dict, pipe, records: int, batch_size: int) -> None:
    """Set ``limit``/``limit_stage`` from the pipeline's steady window (a ``bench.Measurement``)
    against the raw stream, or say why they cannot be told from this split; flag a window
    faster than the device."""
    stream = result["stream"]["images_per_s"]
    result["pipeline"]["steady"] = {"images": pipe.steady_images, "seconds": pipe.steady_s,
                                    "buffer_records": pipe.buffer_records}
    if pipe.steady_images >= MIN_STEADY_IMAGES and pipe.steady_s > 0:
        ratio = pipe.steady_images / pipe.steady_s / stream
        result["limit_stage"] = "disk" if ratio >= DISK_BOUND_FRACTION else "cpu"
        result["limit"] = ("disk (the pipeline keeps up with the raw stream)"
                           if ratio >= DISK_BOUND_FRACTION else
                           f"CPU (decode: the pipeline runs at {ratio:.0%} of the disk's stream "
                           "rate; more workers/cores would help)")
        if ratio > 1.25:
            result["warnings"].append(
                f"the pipeline's steady window ran at {ratio:.1f}x the raw stream's rate, faster "
                "than the device: part of it cannot have come from the disk (a page cache that "
                "could not be dropped?); do not trust the projection")
        return
    result["limit_stage"] = "unknown"
    if pipe.fits_buffer:
        result["limit"] = (
            f"not determined: the split's {records:,} records fit the shuffle buffer "
            f"({pipe.buffer_records:,} records), so an epoch reads them all before decoding "
            "starts and reading and decoding never overlap here as on a larger split (the "
            "figure above is still this split's epoch rate); --buffer-size "
            f"{max(batch_size, records // 4)} shows which stage limits")
    else:
        result["limit"] = (
            f"not determined: records came from the disk while images were delivered for only "
            f"{pipe.steady_images:,} images in {pipe.steady_s:.2f} s (want >= "
            f"{MIN_STEADY_IMAGES}); a larger split, a smaller --buffer-size or a longer "
            "--seconds gives a longer window")


def _rows(result: Dict) -> List[tuple]:
    labels = {"stream": "raw record stream", "pipeline": "full Loader pipeline",
              "folder": "ImageFolder files"}
    return [(labels[k], result[k]) for k in ("stream", "pipeline", "folder") if k in result]


def format_table(result: Dict) -> str:
    """The plain-text summary a person reads: figures, what each rests on, limit, warnings."""
    e = result["epochs"]
    head = (f"{result['path']} ({result['split']}): {result['records']:,} records, "
            f"mean {result['mean_record_kb']:.0f} KB, {e} epochs")
    lines = [f"runtime: {result['runtime']}"] if result.get("runtime") else []
    lines += [head, "",
              f"{'measurement':<22}{'images/s':>10}{'MB/s':>9}{'epoch':>10}{f'{e} epochs':>12}"
              f"  {'rests on'}",
              "-" * 90]
    for label, r in _rows(result):
        lines.append(f"{label:<22}{r['images_per_s']:>10,.0f}{r['mb_per_s']:>9.1f}"
                     f"{_duration(r['epoch_s']):>10}{_hours(r['hours']):>12}"
                     f"  {r['images']:,} images in {r['seconds']:.1f} s"
                     + (f" after a {r['fill_s']:.1f} s fill" if r.get("fill_s") else "")
                     + ("  (interrupted)" if r["interrupted"] else ""))
    lines.append("")
    for key, label in (("stream", "raw stream"), ("pipeline", "pipeline")):
        if key in result and result[key].get("method"):
            lines.append(f"{label}: {result[key]['method']}")
    if "limit" in result:
        lines.append(f"limiting stage: {result['limit']}")
    if "speedup" in result:
        what = "LMDB pipeline" if "pipeline" in result else "raw LMDB stream"
        lines.append(f"speed-up of the {what} over folders: {result['speedup']:.1f}x")
    if "ranks" in result:
        lines.extend(_ranks_lines(result["ranks"]))
    for note in result["notes"]:
        lines.append(f"note: {note}")
    for warning in result.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _ranks_lines(r: dict) -> List[str]:
    """The ``--ranks`` section of the bench's table."""
    n, lines = r["ranks"], [""]
    lines.append(f"{n} ranks on this machine, raw records (no decode), each row from a dropped "
                 f"page cache, {r['seconds']:g} s counted after a {r['warmup']:g} s warm-up:")
    lines.append(f"{'readers':<22}{'all ranks MB/s':>15}{'ranks x slowest':>17}{'epoch':>10}"
                 f"{str(r['epochs']) + ' epochs':>12}  per rank MB/s")
    lines.append("-" * 90)
    for how in HOWS:
        row = r["rows"].get(how)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{LABELS[how]:<22}failed: {row['error'][-300:]}")
            continue
        lines.append(f"{LABELS[how]:<22}{row['mb_per_s']:>15.1f}"
                     f"{row['ranks_x_slowest_mb_per_s']:>17.1f}{_duration(row['epoch_s']):>10}"
                     f"{_hours(row['hours']):>12}  "
                     + " ".join(f"{x:.1f}" for x in row["per_rank_mb_per_s"]))
    lines.append("(ranks x slowest rank: what a DDP job moves at; epoch and hours at that rate)")
    if r.get("node_missing"):
        lines.append(f"node reader: not measured: {r['node_missing']}")
    off = "IMAGENET_SEQ_NODE_READER=0 (or Loader(node_reader=False)) turns it off"
    faster = r.get("faster")
    if faster == "node":
        lines.append(f"verdict: the node reader is faster here, {r['ratio']:.2f}x per-rank "
                     f"readers: keep it (on by default under torchrun with {n} ranks per node; "
                     f"{off})")
    elif faster == "per-rank":
        lines.append(f"verdict: per-rank readers are faster here, {r['per_rank_over_node']:.2f}x "
                     f"the node reader: {off}")
    elif faster == "same":
        lines.append(f"verdict: the same within {SAME_WITHIN:.0%} ({r['ratio']:.2f}x): keep the "
                     f"node reader (less memory and reader CPU than {n} readers; {off})")
    else:
        lines.append("verdict: not determined (a row is missing, see above)")
    kept = [row["note"] for row in r["rows"].values() if row.get("page_cache_evicted") is False]
    if kept:
        lines.append(f"note: ranks: {kept[0]}")
    if r.get("node_reader_env") == "0":
        lines.append("note: IMAGENET_SEQ_NODE_READER=0 is set here: a Loader in this "
                     "environment reads with per-rank readers")
    return lines


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
