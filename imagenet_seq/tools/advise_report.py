"""What ``imagenet-seq-bench --advise`` prints (the report role): what was measured, one
table of choices with predicted hours, the recommendation and the commands that apply it,
and the optional bar chart of predicted hours per choice."""
from __future__ import annotations

import math
import shlex
from typing import Dict, List

__all__ = ["PIXELS_NOTE", "format_advice", "commands", "write_advice_plot"]

PIXELS_NOTE = ("a re-encoded set (--max-size / --quality) no longer gives torchvision's "
               "pixels of the original files: a model trained on it sees other images than "
               "one trained on the originals (smaller, re-compressed); keep the original set "
               "where you compare with published results")

_SECTIONS = {"size": "how the set is stored (one rank, {w} worker threads)",
             "workers": "decode workers", "ranks": "ranks on this machine, this one disk "
                                                    "(node reader: one sequential stream)"}


def _dur(s: float) -> str:
    if s is None or s == math.inf:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _h(h) -> str:
    if h is None or h == math.inf:
        return "-"
    if h < 1:
        return _dur(h * 3600)
    return f"{h:,.0f} h" if h >= 100 else f"{h:.1f} h"


def _measured_lines(r: Dict) -> List[str]:
    m = r["measured"]
    d, far, cpu, sz = m["disk"], m["far_move"], m["cpu"], m["sizes"]
    one = cpu["one_worker"]["images_per_s"]
    lines = [f"disk: {d['mb_per_s']:.1f} MB/s sequential ({d['images']:,} records, "
             f"{d['bytes'] / 1e6:.1f} MB in {d['seconds']:.1f} s, page cache "
             f"{'dropped' if d['page_cache_evicted'] else 'NOT dropped'}); far move "
             f"{far['far_move_ms']:.1f} ms ({far['probes']} probes)"
             + (f"; in an epoch's order {m['plan_read']['mb_per_s']:.1f} MB/s ("
                f"{'the whole epoch' if m['plan_read']['whole_epoch'] else 'part of one'}, "
                f"{m['plan_read']['images']:,} records in {m['plan_read']['seconds']:.1f} s)"
                if m.get("plan_read") else ""),
             f"CPU: {cpu['cpus']} core(s), load {cpu['load_avg_1min']:.1f}; one worker "
             f"{one:,.0f} img/s"
             + (f" (crop decode off: {cpu['one_worker_no_crop_decode']['images_per_s']:,.0f})"
                if "one_worker_no_crop_decode" in cpu else "")
             + f"; {cpu['threads']['workers']} threads {cpu['threads']['images_per_s']:,.0f}"
             f" img/s, {cpu['processes']['workers']} processes "
             f"{cpu['processes']['images_per_s']:,.0f} img/s",
             f"sample: {sz['images']} images, {sz['bytes']['mean'] / 1e3:.0f} KB mean "
             f"(p10 {sz['bytes']['p10'] / 1e3:.0f}, p90 {sz['bytes']['p90'] / 1e3:.0f}), "
             f"longer side p50 {sz['longer_side']['p50']:.0f} px (p90 "
             f"{sz['longer_side']['p90']:.0f}); re-encoded: "
             + ", ".join(f"max {k} {v['bytes_ratio']:.0%} of the bytes, decode "
                         f"{v['decode_ratio']:.2f}x" for k, v in sz.items()
                         if isinstance(v, dict) and "bytes_ratio" in v)]
    if m.get("source"):
        s = m["source"]
        lines.append(f"source: {s['folder']}: {s['images']:,} images, ~{s['total_gb']:.1f} GB; "
                     f"{s['mb_per_s']:.1f} MB/s in on-disk order ({s['files_read']:,} files "
                     f"in {s['seconds']:.1f} s)")
    return lines


def format_advice(r: Dict) -> str:
    """The text a person reads: measured figures, the table, the recommendation."""
    e = r["epochs"]
    lines = [f"runtime: {r['runtime']}",
             f"{r['path']} ({r['split']}): {r['records']:,} records, mean "
             f"{r['mean_record_kb']:.0f} KB; {e} epochs", ""]
    lines += ["measured:"] + [f"  {x}" for x in _measured_lines(r)] + [""]
    head = (f"{'choice':<44}{'epoch':>10}{f'{e} epochs':>11}{'convert':>10}{'memory':>9}"
            f"  limit")
    lines += [head, "-" * len(head)]
    section = None
    for row in r["rows"]:
        if row["section"] != section:
            section = row["section"]
            lines.append(_SECTIONS[section].format(w=r["workers"]) + ":")
        lines.append(f"  {row['choice']:<42}{_dur(row['epoch_s']):>10}{_h(row['hours']):>11}"
                     f"{_h(row['conversion_hours']):>10}{row['memory_gb']:>6.1f} GB  "
                     f"{row['limit']}")
    lines.append("(epoch: predicted, never faster than the disk's measured rate; convert: "
                 "hours to convert, with --source; memory: the Loaders' own; limit: the "
                 "slower of disk and CPU -- the GPU is not measured: if it is slower than "
                 "these rates, it limits)")
    rec = r["recommendation"]
    lines += ["", "recommendation: " + _rec_sentence(r, rec)]
    lines += [f"  {c}" for c in commands(r)]
    if rec["max_size"]:
        lines.append(f"note: {PIXELS_NOTE}")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    for w in r.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def _rec_sentence(r: Dict, rec: Dict) -> str:
    what = ("keep the set as stored (torchvision's pixels)" if not rec["max_size"] else
            f"convert with --max-size {rec['max_size']} --quality {rec['quality']} "
            f"(saves {_h(rec['saves_hours'])} of {r['epochs']} epochs)")
    s = (f"{what}, {rec['workers']} decode worker {rec['worker_type']}"
         f"{'s' if rec['workers'] > 1 else ''}: {_dur(rec['epoch_s'])} per epoch, "
         f"{_h(rec['hours'])} for {r['epochs']} epochs, limited by the {rec['limit']}")
    if rec["limit"] == "disk" and not rec["max_size"]:
        s += " (a faster disk, or files in page cache, would go faster)"
    ranks = [x for x in r["rows"] if x["section"] == "ranks"]
    if ranks:
        s += (f"; {ranks[-1]['ranks']} ranks on this disk: {_dur(ranks[-1]['epoch_s'])} per "
              f"epoch, limited by the {ranks[-1]['limit']}")
    return s


def commands(r: Dict) -> List[str]:
    """The command lines (and the Loader line) that apply the recommendation."""
    rec = r["recommendation"]
    root = shlex.quote(r["path"])
    out = []
    if rec["max_size"]:
        src = shlex.quote(r["measured"]["source"]["folder"]) if r["measured"].get("source") \
            else "/path/to/imagenet"
        new = shlex.quote(r["path"].rstrip("/") + f"_max{rec['max_size']}")
        out.append(f"imagenet-seq-preprocess {src} {new} --max-size {rec['max_size']} "
                   f"--quality {rec['quality']}")
        out.append(f"imagenet-seq-bench {new} --advise   # check the new set")
        root = new
    wt = "" if rec["worker_type"] == "thread" else ", worker_type='process'"
    out.append(f"Loader({root!r}, '{r['split']}', batch_size={r['batch_size']}, "
               f"num_workers={rec['workers']}{wt})")
    if r["world_size"] > 1:
        out.append(f"torchrun --nproc-per-node {r['world_size']} train.py   # one node reader "
                   "per machine (the default); num_workers per rank: "
                   f"{max(1, r['measured']['cpu']['cpus'] // r['world_size'])}")
    return out


def write_advice_plot(r: Dict, path: str) -> None:
    """A bar chart of predicted hours for ``--epochs`` epochs, one bar per choice."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'imagenet_seq[bench]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    colors = {"disk": "#4c72b0", "CPU": "#dd8452"}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.42 * len(rows)), dpi=120)
    hours = [x["hours"] for x in rows]
    bars = ax.barh([x["choice"] for x in rows], hours, color=[colors[x["limit"]] for x in rows])
    for bar, x in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f"  {_h(x['hours'])} ({x['limit']})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(hours + [1e-9]) * 1.35)
    ax.set_xlabel(f"predicted hours for {r['epochs']} epochs of {r['records']:,} images "
                  "(bar colour: the limit)")
    ax.set_title(f"{r['path']} ({r['split']}): predicted by imagenet-seq-bench --advise",
                 fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
