"""WebDataset shards converted in ONE sweep each: no listing pass.

The shards of a split are read one after the other in the order given (a folder: sorted
names), each front to back (``tar_sweep.SeqFile``): a group's members (``<key>.jpg``,
``<key>.cls``, ``<key>.json``) lie together, so a group is settled when the next key starts
and its image goes to pass 1 at once, its label read from the sidecar beside it. The rules
are ``wds_source``'s (one image and a label per group, the report rows, odd member kinds
counted once per kind); the same record name in two groups is stored once, the FIRST met
(settled at the merge: ``settle.decider``'s ``repeat``). Classes: ``--classes``, or the
numbers 0 .. the largest label seen, known at the end of the sweep.

Resume: an item's token is (its group's first sequence number, the shard, the byte offset
of the group's first header): ``--resume`` reads from the group the last commit stood in.
"""
from __future__ import annotations

import copy
import os
import posixpath
from typing import List, Optional

from imagenet_seq.convert.scan import ScanError
from imagenet_seq.convert.sweep import ThreadSweep
from imagenet_seq.convert.tar_names import NEVER_READ, normalise, not_a_file
from imagenet_seq.convert.tar_sweep import _members, open_sweep
from imagenet_seq.convert.wds_source import (IMAGE_KINDS, MAX_SIDECAR, SIDECARS, group_key,
                                             parse_label)

__all__ = ["MAX_CLASSES", "WdsSweep"]

MAX_CLASSES = 1_000_000  # without --classes: largest label + 1


class WdsSweep:
    """The shards of one split as a one-sweep source (``sweep``'s contract)."""

    def __init__(self, shards: List[str], classes: Optional[List[str]], classes_from: str,
                 classes_file: Optional[str] = None):
        self.shards, self.fixed, self.classes_from = shards, classes, classes_from
        self.classes_file = classes_file
        stats = [os.stat(p) for p in shards]
        self.source_bytes = sum(st.st_size for st in stats)
        self._stamp = [[os.path.realpath(p), st.st_size, st.st_mtime_ns]
                       for p, st in zip(shards, stats)]
        self.total = None
        self.how = "shards:given"
        self.last_wins = False  # the first record of a name is stored (wds_source)
        self.lo, self.hi = 0, len(shards)  # the shards this sweep reads (:meth:`part`)

    def identity(self) -> str:
        if (self.lo, self.hi) != (0, len(self.shards)):
            return repr(["wds", self._stamp[self.lo:self.hi], self.fixed, self.lo])
        return repr(["wds", self._stamp, self.fixed])

    def part(self, lo: int, hi: int) -> "WdsSweep":
        """The same sweep over shards ``lo .. hi - 1`` only (a distributed conversion's part:
        ``dist_parts``); records keep the shard's index in the whole list as their origin."""
        out = copy.copy(self)
        out.lo, out.hi = lo, hi
        out.source_bytes = sum(st[1] for st in self._stamp[lo:hi])
        return out

    def describe(self, rel: str) -> str:
        if not rel:
            return f"{len(self.shards)} WebDataset shards from {self.shards[0]}"
        return rel

    def describe_item(self, rel: str, origin: int) -> str:
        return f"{self.shards[origin]}:{rel}"

    def reader(self, cursor: dict, read_ahead: Optional[int]):
        return ThreadSweep(self._items, cursor)

    def classes(self, found: dict) -> List[str]:
        top = found.get("top", -1)
        if self.fixed is not None:
            return self.fixed
        if top >= MAX_CLASSES:
            raise ScanError(f"labels reach {top}: without --classes the classes are 0..{top}; "
                            "pass --classes FILE naming each (label i = line i + 1)")
        if top < 0:
            raise ScanError(f"no image of the {len(self.shards)} shards can be stored; fix the "
                            "shards or pass other ones")
        return [str(i) for i in range(top + 1)]

    def resolver(self, found: dict):
        return None  # every label is in the shards

    def repeat(self, first: int, this: int) -> str:
        return (f"repeats the name of a record stored from "
                f"{os.path.basename(self.shards[first])} (in "
                f"{os.path.basename(self.shards[this])}); stored once, as that one; this copy "
                f"is {NEVER_READ}")

    # -- the sweep
    def _items(self, cursor: dict):
        token = cursor.get("token")
        st = {"seq": token[0] if token else 0, "top": -1, "names": {}}
        for k in range(token[1] if token else self.lo, self.hi):
            at = token[2] if token and k == token[1] else None
            yield from self._shard(k, at, st)

    def _shard(self, k: int, at: Optional[int], st: dict):
        path = self.shards[k]
        shard = os.path.basename(path)
        f, tf = open_sweep(path, at)
        try:
            group: List[tuple] = []  # (key, kind, name, data or None, size)
            g0 = [st["seq"], at or 0]  # the open group's first seq and header offset
            seen: set = set()
            counts = {"labelled": 0, "members": 0, "first": []}

            def tok():
                return [g0[0], k, g0[1]]
            for m in _members(tf, path, "the archive"):
                if m.isdir():
                    continue
                name, unsafe = normalise(m.name)
                if unsafe or not m.isfile():
                    why = unsafe or not_a_file(m)
                    yield self._row(st, tok(), (m.name if unsafe else name),
                                    f"{why} (in {shard})")
                    continue
                counts["members"] += 1
                if len(counts["first"]) < 3:
                    counts["first"].append(name)
                got = group_key(name)
                if group and (got is None or got[0] != group[0][0]):
                    yield from self._close(group, shard, seen, st, tok(), counts, k)
                    group = []
                if got is None:
                    kind = "(hidden file)" if posixpath.basename(name).startswith(".") else \
                        "(no extension)"
                    g0[:] = [st["seq"], m.offset]
                    yield self._odd(st, tok(), kind, name, shard)
                    continue
                if not group:
                    g0[:] = [st["seq"], m.offset]
                kind = got[1].lower()
                data = None
                if kind in IMAGE_KINDS or (kind in SIDECARS and m.size <= MAX_SIDECAR):
                    f.seek(m.offset_data)
                    data = f.read(m.size)
                    if len(data) != m.size:
                        raise ScanError(f"{path} ends inside member {name} (the shard is cut "
                                        "short); download it again")
                group.append((got[0], got[1], name, data, m.size))
            if group:
                yield from self._close(group, shard, seen, st, tok(), counts, k)
            if at is None and counts["members"] and not counts["labelled"]:
                raise ScanError(
                    f"{path} is not a WebDataset shard: no group of its members has a label "
                    f"file (<key>.cls, or <key>.json, beside the image <key>.jpg); its first "
                    f"members: {counts['first']}."
                    + (" Several .tar inputs are read as WebDataset shards; a tar of an "
                       "ImageFolder tree (train/<class>/<image>) is converted alone, ImageNet's "
                       "archives keep their names (ILSVRC2012_img_train.tar)"
                       if len(self.shards) > 1 else ""))
        finally:
            f.close()

    def _seq(self, st) -> int:
        s = st["seq"]
        st["seq"] += 1
        return s

    def _row(self, st, token, path, why, origin=0):
        seq = self._seq(st)
        return (seq, token, origin, path, 0), path, 0, ("note", why)

    def _odd(self, st, token, kind, name, shard):
        seq = self._seq(st)
        return (seq, token, 0, "", 0), "", 0, ("mark", {"odd": [kind, name, shard]})

    def _close(self, group, shard, seen, st, token, counts, k):
        """One group -> its odd-kind marks, then a record or a report row."""
        key = group[0][0]
        kinds = [g[1].lower() for g in group]
        images = [g for g in group if g[1].lower() in IMAGE_KINDS]
        cls = [g for g in group if g[1].lower() == "cls"]
        meta = [g for g in group if g[1].lower() == "json"]
        for g in group:
            if g[1].lower() not in IMAGE_KINDS and g[1].lower() not in SIDECARS:
                yield self._odd(st, token, "." + g[1].lower(), g[2], shard)
        counts["labelled"] += bool(cls or meta)
        if not images and not cls and not meta:
            return
        path = images[0][2] if len(images) == 1 else \
            f"{key}.{{{','.join(g[1] for g in group)}}}" if len(group) > 1 else group[0][2]
        why = None
        if key in seen:
            why = "its key repeats an earlier group of this shard (WebDataset keys are unique)"
        elif len(set(kinds)) < len(kinds):
            twice = sorted({x for x in kinds if kinds.count(x) > 1})
            why = f"the group holds {', '.join('.' + x for x in twice)} more than once"
        elif not images:
            why = "the group has no image (.jpg, .jpeg, .png, .webp ...)"
        elif len(images) > 1:
            why = f"the group has {len(images)} images ({', '.join(g[2] for g in images)}); " \
                  "one per group"
        elif not cls and not meta:
            why = "the group has no label (.cls, or .json with a \"label\" field)"
        seen.add(key)
        if why is None:
            src = cls[0] if cls else meta[0]
            label, name, bad = parse_label(src[1].lower(), src[3], src[4])
            if meta and cls:
                _, name, _ = parse_label("json", meta[0][3], meta[0][4])
            limit = len(self.fixed) if self.fixed is not None else None
            if bad:
                why = f"label file {src[2]} {bad}"
            elif label < 0:
                why = f"label {label} in {src[2]} (negative: no label; timm's shards mark " \
                      "images outside a subset's classes so)"
            elif limit is not None and label >= limit:
                why = (f"label {label} is outside the class list (0..{limit - 1} from "
                       f"{self.classes_from}) (in {shard})")
            else:
                self._check_name(label, name, shard)
                seq = self._seq(st)
                if label > st["top"]:  # the largest label so far: the class list's length
                    st["top"] = label
                    yield (seq, token, k, "", 0), "", 0, ("mark", {"top": label})
                yield (seq, token, k, images[0][2], label), images[0][2], label, images[0][3]
                return
            if "(in " not in why:
                why = f"WebDataset group {key!r}: {why} (in {shard})"
        else:
            why = f"WebDataset group {key!r}: {why} (in {shard})"
        yield self._row(st, token, path, f"{why}; {NEVER_READ}", k)

    def _check_name(self, label: int, name: Optional[str], shard: str) -> None:
        """A ``.json``'s class name against ``--classes`` (timm's: the WNID)."""
        if name is None or self.fixed is None or label >= len(self.fixed):
            return
        if self.fixed[label] != name:
            raise ScanError(
                f"--classes {self.classes_file}:{label + 1} names label {label} "
                f"{self.fixed[label]!r}, but the .json of {shard} names it {name!r}: pass the "
                "class list these shards were labelled with (line i + 1 = label i; timm's "
                "imagenet22k_synsets.txt for imagenet-22k-wds), or no --classes")
