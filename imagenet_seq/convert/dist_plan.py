"""Between the two passes of a distributed conversion: what the parts found, put together, and
where each shard's merge starts.

Each process's pass 1 wrote sorted runs and, beside each, its keys file (``sort_runs``: each
record's key, sequence number, origin, label header and size in the run; no image bytes).
:func:`cut_points` merges the keys files of every part in the merge's order, deciding each
item as the merge will (``passes.settle_item``), and notes at each shard's first position the
byte offset reached in every run, the records written and the report rows added before it:
each shard can then be merged by a different process, from there, into the file the
one-process conversion writes.
"""
from __future__ import annotations

from typing import List, Sequence

from imagenet_seq import format as fmt
from imagenet_seq.convert.passes import settle_item
from imagenet_seq.convert.sort_runs import KeysReader, merge_readers

__all__ = ["merge_found", "cut_points"]


def merge_found(founds: Sequence[dict]) -> dict:
    """What every part's sweep found out (``pass1.Split.mark``), as one sweep would have:
    classes and flags united, the largest label, odd member kinds counted over all parts
    (the first part's example kept), nested tars and roots united."""
    out: dict = {"classes": [], "containers": {}, "flags": []}
    classes, flags = set(), []
    for f in founds:
        classes.update(f.get("classes", []))
        flags += [x for x in f.get("flags", []) if x not in flags]
        for name, seqs in f.get("containers", {}).items():
            out["containers"].setdefault(name, []).extend(seqs)
        if "top" in f:
            out["top"] = max(out.get("top", -1), f["top"])
        for x in f.get("first", []):
            if len(out.setdefault("first", [])) < 3 and x not in out["first"]:
                out["first"].append(x)
        for k, v in f.get("roots", {}).items():
            out.setdefault("roots", {})[k] = v
        for kind, slot in f.get("odd", {}).items():
            have = out.setdefault("odd", {}).get(kind)
            out["odd"][kind] = list(slot) if have is None else \
                [have[0] + slot[0], have[1], have[2], max(have[3], slot[3])]
    out["classes"], out["flags"] = sorted(classes), flags
    return out


def cut_points(keys_paths: List[str], starts: Sequence[int], decide) -> List[dict]:
    """For each merge position in ``starts`` (ascending; each shard's first): ``offsets`` (the
    byte offset in every run where the merge goes on), ``written`` (records stored before),
    ``rows`` (report rows the merge added before) and ``last_merged`` (key, origin of the
    item before it, as ``merge_pass`` keeps it)."""
    offsets = [0] * len(keys_paths)
    out: List[dict] = []
    merged = written = rows = 0
    before: List = [None, None]
    want = list(starts)

    def note() -> None:  # the cut points at the position reached
        while want and merged == want[0]:
            out.append({"offsets": list(offsets), "merged": merged, "written": written,
                        "rows": rows, "last_merged": None if before[0] is None else
                        [before[0].hex(), before[1]]})
            want.pop(0)
    items = merge_readers([KeysReader(p) for p in keys_paths])
    try:
        for key, seq, origin, header, i, after, replaced in items:
            note()
            if not want:
                break
            (raw,) = fmt.RECORD_HEADER.unpack(header)
            label, row = settle_item(decide, key, seq, origin, raw, replaced, before)
            offsets[i] = after
            merged += 1
            rows += row is not None
            written += label is not None
    finally:
        items.close()
    note()
    if want:
        raise ValueError(f"the runs hold {merged} items, fewer than the {want[0]} a shard "
                         "starts at")
    return out
