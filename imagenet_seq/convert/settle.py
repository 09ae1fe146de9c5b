"""What a one-sweep conversion can only settle once the sweep is over.

An archive is read front to back once, so while it is read its class list is not known yet
(a tar of a tree: its class folders, all of them) and a member may still be replaced (tar
extraction keeps the LAST member of a name, and a nested tar replaces an earlier one of the
same name as a whole). The runs therefore hold every copy met, each with its sequence number
and the nested tar it came from; the merge (``passes.merge_pass``) asks :func:`decider`
whether to store a record and with which label, and :func:`settle_skips` /
:func:`report_rows` give the report rows the extracted tree's conversion would give.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Tuple

from imagenet_seq import format as fmt
from imagenet_seq.convert.scan import ScanError
from imagenet_seq.convert.sort_runs import NO_ORIGIN
from imagenet_seq.convert.tar_names import NEVER_READ

__all__ = ["DUPLICATE", "STORED", "superseded", "settle_skips", "decider", "report_rows"]

UNKNOWN_LABEL = 0xFFFFFFFF
STORED = "stored"  # decide's second value: store, and mark earlier rows of the path replaced
DUPLICATE = ("duplicate member name: a later member of the archive has the same name and "
             f"replaces this one, as extraction does; this copy is {NEVER_READ}")


def _earlier_copy(name: str) -> str:
    return (f"in an earlier copy of the nested tar {name!r}, which a later member of the "
            "same name replaces, as extraction does; never read")


def superseded(found: dict) -> Dict[int, str]:
    """Sequence numbers of the nested tars a later one of the same name replaces -> name."""
    out = {}
    for name, seqs in found.get("containers", {}).items():
        for s in sorted(seqs)[:-1]:
            out[s] = name
    return out


def settle_skips(env, found: dict, state: dict) -> None:
    """At the end of the sweep: the skip rows met inside a replaced nested tar say so (in
    ``env``, shard 0's .partial), the member kinds not used get their row (with their count);
    ``state["skip_last"]``: path -> the highest sequence number among the rows (a record of
    that path met earlier is a replaced copy, one met later replaces them); ``state`` is
    committed in the same transaction."""
    gone = superseded(found)
    last: Dict[str, int] = {}
    with env.begin(write=True) as txn:
        for kind, (n, name, shard, _) in sorted(found.get("odd", {}).items()):
            row = {"path": name, "note": True,
                   "reason": f"member kind {kind} is not used: {n} such member"
                             f"{'s' if n > 1 else ''} in this split's shards (the first: "
                             f"this one, in {shard}); {NEVER_READ}"}
            txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
            state["skipped"] += 1
        cur = txn.cursor()
        rows = []
        if cur.set_range(fmt.SKIP_PREFIX):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(fmt.SKIP_PREFIX):
                    break
                rows.append((k, json.loads(bytes(v))))
        flat = "folders:val" not in found.get("flags", [])
        for k, d in rows:
            if "if_flat" in d:  # a tar of a tree's val/: its reason depends on the layout
                if flat:
                    d["reason"] = d["if_flat"]
                del d["if_flat"]
                txn.put(k, json.dumps(d).encode())
            if d.get("origin") in gone and "nested tar" not in d["reason"]:
                d["reason"], d["note"] = _earlier_copy(gone[d["origin"]]), True
                txn.put(k, json.dumps(d).encode())
            if "seq" in d and d.get("origin") not in gone:
                last[d["path"]] = max(last.get(d["path"], -1), d["seq"])
        state["skip_last"] = last
        txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())


def decider(classes: List[str], found: dict, skip_last: Dict[str, int],
            resolve: Optional[Callable[[str], Tuple[Optional[str], Optional[str]]]] = None,
            repeat: Optional[Callable[[int, int], str]] = None):
    """``decide(rel, label, seq, origin, replaced, prev)`` for the merge (``passes``):
    (label, None) to store the record, (None, report reason) to drop it. ``resolve(rel)``:
    (class name, None) or (None, why not stored) for a record whose label the sweep left to
    the end. ``repeat(first origin, this origin)``: the FIRST record of a name wins
    (WebDataset shards), this is the reason the others give; else the last (a tar)."""
    gone = superseded(found)
    index = {c: i for i, c in enumerate(classes)}

    def decide(rel, label, seq, origin, replaced, prev=None):
        if repeat is not None:
            if prev is not None:
                return None, repeat(prev, origin)
        elif origin != NO_ORIGIN and origin in gone:
            return None, _earlier_copy(gone[origin])
        elif replaced or skip_last.get(rel, -1) > seq:
            return None, DUPLICATE
        mark = STORED if rel in skip_last else None  # earlier rows of it: replaced
        if label != UNKNOWN_LABEL:
            return label, mark
        name, why = resolve(rel) if resolve else (None, "no label")
        if why is not None:
            return None, why
        if name not in index:
            raise ScanError(f"{rel}: class {name!r} is not a train class; convert the "
                            "matching train archive (classes = its folders)")
        return index[name], mark
    return decide


def report_rows(skipped: List[dict]) -> List[Tuple[str, str]]:
    """The report rows of skip records in the order met: of several rows of one path (an
    archive naming it twice), all but the last met say the later copy replaced them."""
    if skipped and all("seq" in d for d in skipped):  # an archive's: the rows the merge
        skipped = sorted(skipped, key=lambda d: d["seq"])  # added, where their copy was met
    last: Dict[str, int] = {}
    for d in skipped:
        if "seq" in d and "nested tar" not in d["reason"]:
            last[d["path"]] = max(last.get(d["path"], -1), d["seq"])
    out = []
    for d in skipped:
        if d.get("marker"):
            continue
        why = d["reason"]
        if "seq" in d and "nested tar" not in why and last.get(d["path"], -1) > d["seq"]:
            why = DUPLICATE
        out.append((d["path"], why))
    return out
