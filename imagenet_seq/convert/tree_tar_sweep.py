"""A tar of an ImageFolder tree (``[prefix/]train/<class>/<image>``, ``val/...``) converted
in ONE sweep for all its splits at once: each member is read as it is met and handed to the
pass 1 of the split it belongs to (``passes.read_pass`` with one context per split).

The rules are ``tar_names``' (a split's folder is the first ``<split>/`` folder a name shows,
names normalised, a name that leaves its split reported in the split it names lexically,
links never read) applied member by member. What only the sweep's end tells is settled at
the merge (``settle``): the classes (train's class folders, sorted; they label val too),
whether val is flat (no image in a class folder: labelled by ``--val-labels``), the last
member of a name. An item's tag carries its split (``tag[5]``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from imagenet_seq.convert.scan import ScanError, is_image, not_image_reason
from imagenet_seq.convert.sort_runs import NO_ORIGIN
from imagenet_seq.convert.sweep import UNKNOWN, ThreadSweep
from imagenet_seq.convert.tar_names import (NEVER_READ, _parts, _root_of, normalise,
                                            not_a_file, sparse_error)
from imagenet_seq.convert.tar_sweep import _members, open_sweep

__all__ = ["TreeTarSweep", "TreeTarView", "OUTSIDE"]

OUTSIDE = "file outside any class folder"


class TreeTarSweep:
    """The sweep of one tar of a tree, shared by the views of its splits (``splits``: the
    ones converted; ``labels``: ``--val-labels`` for a flat val/)."""

    def __init__(self, path: str, splits: List[str], labels: Optional[Dict[str, str]],
                 labels_name: str):
        self.path, self.splits = path, list(splits)
        self.labels, self.labels_name = labels, labels_name
        st = os.stat(path)
        self.source_bytes = st.st_size
        self.stamp = [os.path.realpath(path), st.st_size, st.st_mtime_ns]
        self.swept: set = set()  # splits whose pass 1 a sibling's sweep did (writer)
        self.files: Dict[str, List[str]] = {}  # split -> its unfinished files (writer)

    def view(self, split: str) -> "TreeTarView":
        return TreeTarView(self, split)

    def items(self, cursor: dict, found: dict, splits: List[str]):
        """Items of ``splits`` (and the marks every split needs) from ``cursor`` on."""
        token = cursor.get("token")
        f, tf = open_sweep(self.path, token[1] if token else None)
        try:
            roots: Dict[str, str] = dict(found.get("roots", {}))
            st = {"seq": token[0] if token else 0, "classes": set(), "flags": set()}
            for split, root in sorted(roots.items()):  # found before the cursor: told again
                yield ((st["seq"], [st["seq"], token[1] if token else 0, -1, -1], NO_ORIGIN,
                        "", 0, None), "", 0, ("mark", {"root": [split, root]}))
            for m in _members(tf, self.path, "the archive"):
                if not m.isdir():
                    yield from self._member(f, m, roots, st, splits)
        finally:
            f.close()

    def _member(self, f, m, roots, st, splits):
        seq = st["seq"]
        st["seq"] += 1
        token = [seq, m.offset, -1, -1]

        def item(split, rel, data, label=0):
            return (seq, token, NO_ORIGIN, rel, label, split), rel, label, data
        name, unsafe = normalise(m.name)
        if len(st.setdefault("first", [])) < 3:  # named when the tar is not a tree at all
            st["first"].append(m.name)
            yield item(None, "", ("mark", {"first": m.name}))
        for split in ("train", "val"):  # a split's folder: the first name that shows it
            if split not in roots:
                parts = (name or "").split("/")
                if split in parts[:-1]:
                    roots[split] = "/".join(parts[:parts.index(split) + 1]) + "/"
                    yield item(None, "", ("mark", {"root": [split, roots[split]]}))
        rparts = {s: _parts(r) for s, r in roots.items()}
        lexical = _root_of(_parts(m.name), rparts)
        if unsafe:  # reported where its name points, or in the first split converted
            where = lexical if lexical is not None else self.splits[0]
            if where in splits:
                yield item(where, m.name, ("note", unsafe))
            return
        split = _root_of(name.split("/"), rparts)
        if lexical is not None and split != lexical:
            if lexical in splits:
                yield item(lexical, m.name, ("note", f"unsafe member name {m.name!r}: resolves "
                                                     f"to {name!r}, outside {roots[lexical]}; "
                                                     f"{NEVER_READ}"))
            return
        if split is None:
            return  # outside every split folder: not part of the conversion
        rel = name[len(roots[split]):]
        if not m.isfile():
            if split in splits:
                yield item(split, rel, ("note", not_a_file(m)))
            return
        if m.issparse():
            raise sparse_error(self.path, name)
        image = is_image(rel)
        if split == "train" and image and "/" in rel:
            cls = rel.split("/")[0]
            if cls not in st["classes"]:  # every split needs train's classes
                st["classes"].add(cls)
                yield item(None, "", ("mark", {"class": cls}))
        if split == "val" and image and "/" in rel and "val" not in st["flags"]:
            st["flags"].add("val")
            yield item(None, "", ("mark", {"flag": "folders:val"}))
        if split not in splits:
            return
        if "/" not in rel and (split == "train" or not image):
            # val: outside a class folder, unless val is flat (no image in a class folder)
            yield item(split, rel, ("note", OUTSIDE if split == "train" else
                                    {"else": OUTSIDE, "if_flat": not_image_reason(rel)}))
            return
        if not image:
            yield item(split, rel, ("note", not_image_reason(rel)))
            return
        f.seek(m.offset_data)
        data = f.read(m.size)
        if len(data) != m.size:
            raise ScanError(f"{self.path} ends inside member {name} (the archive was cut "
                            "short); download it again")
        yield item(split, rel, data, UNKNOWN)


class TreeTarView:
    """One split of a :class:`TreeTarSweep` (``sweep``'s contract); ``joint``: the splits
    whose pass 1 the sweep feeds at once (the writer sets it)."""

    last_wins = True  # the last member of a name wins, as extraction does
    wants_found = True  # a resumed sweep needs the split folders found before its cursor
    how = "tar"
    total = None

    def __init__(self, shared: TreeTarSweep, split: str):
        self.shared, self.split = shared, split
        self.source_bytes = shared.source_bytes
        self.joint = [split]

    def identity(self) -> str:
        return repr(["tree-tar", self.shared.stamp, self.split, self.shared.labels_name,
                     sorted(self.shared.labels.items()) if self.shared.labels else None])

    def describe(self, rel: str) -> str:
        return f"{self.shared.path}:{rel}" if rel else self.shared.path

    def reader(self, cursor: dict, read_ahead: Optional[int], found: Optional[dict] = None):
        return ThreadSweep(lambda c: self.shared.items(c, found or {}, self.joint), cursor)

    def _need_root(self, found: dict, split: str) -> None:
        if split not in found.get("roots", {}):
            if split == "train":
                raise ScanError(f"{self.shared.path} is none of the tars the converter reads "
                                f"(first members: {found.get('first', [])}): not a tar of an "
                                "ImageFolder tree (no train/ folder: train/<class>/<image>, "
                                "and val/...), not a WebDataset shard "
                                "(no <key>.jpg beside a <key>.cls or <key>.json label), not "
                                "ImageNet's ILSVRC2012_img_train.tar / _img_val.tar "
                                "(recognised by those names)")
            raise ScanError(f"{self.shared.path} holds no {split}/ folder; add it or pass "
                            "--splits train")

    def classes(self, found: dict) -> List[str]:
        """Train's class folders, sorted. Raises ScanError for what the sweep showed wrong
        with ANY split converted (so the first split's conversion stops before its merge)."""
        self._need_root(found, "train")
        for s in self.shared.splits:
            self._need_root(found, s)
        flat = "val" in self.shared.splits and "folders:val" not in found.get("flags", [])
        if flat and self.shared.labels is None:
            raise ScanError(f"{self.shared.path}:{found['roots']['val']} has no class folders "
                            "(flat layout); pass --val-labels FILE ('<filename> <class>' lines "
                            "or Kaggle's LOC_val_solution.csv)")
        return sorted(found.get("classes", []))

    def resolver(self, found: dict):
        if self.split == "train":
            return lambda rel: (rel.split("/")[0], None)
        flat = "folders:val" not in found.get("flags", [])
        labels = self.shared.labels or {}

        def resolve(rel):
            if "/" in rel:
                return rel.split("/")[0], None
            if not flat:
                return None, OUTSIDE
            stem = os.path.splitext(os.path.basename(rel))[0]
            if stem not in labels:
                raise ScanError(f"{self.shared.path}:{found['roots']['val']}{rel} has no label "
                                f"in {self.shared.labels_name}; pass --val-labels FILE naming "
                                "every image")
            return labels[stem], None
        return resolve
