"""Positionings in a slowfs request log (``SLOWFS_TRACE``), as served and in the kernel's order.

    python benchmarks/slowfs_trace.py TRACE [TRACE ...] [--window T0 T1] [--near-kb 64] [--json]

Each line of a log is ``arrival done offset size kernel_id path`` (``benchmarks/slowfs.py``;
older logs have no id). The requests are replayed under hdd-fifo's rule (a backward move, or a
forward one beyond ``--near-kb``, or another file, is a positioning) twice: in the order the
device served them (completion times: what the model charged), and in the order the kernel
queued them (its request ids). The two differ where the emulator served requests out of the
kernel's order; what is left in the kernel's order is what the reader itself asked for.
``--window`` keeps the requests completed within ``[T0, T1)`` (``time.monotonic()`` of the
run, e.g. a node_reader.json row's ``window``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

Row = Tuple[float, float, int, int, int, str]  # arrival, done, offset, size, kernel id, path


def load(path: str, window: Optional[Sequence[float]] = None) -> List[Row]:
    """The requests of a log (completed inside ``window`` when given)."""
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 5)
            if len(parts) == 6 and parts[4].lstrip("-").isdigit():
                a, d, off, n, uid, name = parts
            elif len(parts) >= 5:  # a log without ids
                a, d, off, n, name, uid = *parts[:4], " ".join(parts[4:]), "-1"
            else:
                continue
            row = (float(a), float(d), int(off), int(n), int(uid), name)
            if window is None or window[0] <= row[1] < window[1]:
                rows.append(row)
    return rows


def positionings(rows: Sequence[Row], near: int) -> Dict[str, object]:
    """Replays ``rows`` in the order given: positionings, and how far the moves went."""
    head = None
    back: List[int] = []
    far: List[int] = []
    first = 0
    for _, _, off, n, _, name in rows:
        if head is None or head[0] != name:
            first += 1
        else:
            gap = off - head[1]
            if gap < 0:
                back.append(-gap)
            elif gap > near:
                far.append(gap)
        head = (name, off + n)
    return {"positionings": first + len(back) + len(far), "backward": len(back),
            "backward_kib_median": _median_kib(back), "forward_far": len(far),
            "forward_kib_median": _median_kib(far)}


def _median_kib(v: List[int]) -> Optional[int]:
    return sorted(v)[len(v) // 2] // 1024 if v else None


def summary(rows: Sequence[Row], near: int) -> Dict[str, object]:
    """Requests, bytes, rate, and positionings as served and in the kernel's order."""
    if not rows:
        return {"requests": 0}
    served = sorted(rows, key=lambda r: r[1])
    span = served[-1][1] - min(r[0] for r in rows)
    total = sum(r[3] for r in rows)
    out: Dict[str, object] = {"requests": len(rows), "mb": round(total / 1e6, 1),
                              "mb_per_s": round(total / 1e6 / max(span, 1e-9), 1),
                              "served": positionings(served, near)}
    if all(r[4] >= 0 for r in rows):
        out["kernel_order"] = positionings(sorted(rows, key=lambda r: r[4]), near)
        latest, late = -1, 0
        for r in served:  # served after a request the kernel queued later
            late += r[4] < latest
            latest = max(latest, r[4])
        out["served_out_of_kernel_order"] = late
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--window", nargs=2, type=float, metavar=("T0", "T1"))
    p.add_argument("--near-kb", type=int, default=64,
                   help="forward distance read without positioning (hdd-fifo's: 64)")
    p.add_argument("--json", action="store_true", help="one JSON object per trace")
    args = p.parse_args(argv)
    for path in args.traces:
        s = summary(load(path, args.window), args.near_kb * 1024)
        if args.json:
            print(json.dumps(dict(trace=path, **s)))
            continue
        print(f"{path}: {s['requests']} requests", end="")
        if s["requests"]:
            print(f", {s['mb']} MB, {s['mb_per_s']} MB/s")
            for what in ("served", "kernel_order"):
                if what in s:
                    q = s[what]
                    print(f"  {what:12}: {q['positionings']:5} positionings ({q['backward']} "
                          f"backward, median {q['backward_kib_median']} KiB; "
                          f"{q['forward_far']} far forward, median {q['forward_kib_median']} KiB)")
            if "served_out_of_kernel_order" in s:
                print(f"  served after a request the kernel queued later: "
                      f"{s['served_out_of_kernel_order']}")
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
