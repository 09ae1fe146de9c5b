"""WebDataset shards as the source of a split: ``.tar`` files whose members are
``<key>.<ext>`` groups, read in place (timm's ``imagenet-22k-wds``: ``<key>.jpg`` + ``<key>.cls``
+ ``<key>.json`` in ``imagenet22k-train-0000.tar`` ...).

A group is the run of consecutive members sharing a key, the key being the member's name up to
the first dot of its file name (``a/n01440764_10026.jpg`` -> key ``a/n01440764_10026``, kind
``jpg``), as WebDataset groups them. One group is one record when it holds

* exactly one image (kind ``jpg``, ``jpeg``, ``png``, ``webp`` or another of the converter's
  image formats, any case), and
* a label: ``<key>.cls``, an integer as text; or, without one, ``<key>.json``, an object
  whose ``"label"`` field (else ``"cls"``) is an integer. ``"label"`` is what timm's shards
  (and most writers) store; ``"cls"`` is the name of the label file, used by writers that put
  everything in the JSON. A negative label is no label (timm's shards mark images outside a
  subset's classes with -1).

Any other group is skipped and reported (no image, two images, a member twice, no label, a
label that is not an integer or outside ``--classes``, a key already stored): one report row
per group, naming the shard. Members of other kinds (``.txt`` captions ...) are not used: one
report row per kind and split, with the count. The record's name (its path in the report and
in the write order) is ``<key>.<image kind>`` as the shard spells it, without the shard's name:
re-cutting the same samples into other shards changes no name. The same name in two groups
is stored once, the first in the order the shards were given.

Reading: the shards are listed (every header, as for any tar, ``tar_source.list_tar``), the
small label members read as the listing passes them (they lie beside their headers: no extra
pass), then the images are read by absolute offset (``tar_source.TarSource``'s ``pread``), the
shards one after the other in on-disk order and each front to back.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from imagenet_seq.convert import tar_source
from imagenet_seq.convert.disk_order import disk_order
from imagenet_seq.convert.images import IMAGE_EXTENSIONS
from imagenet_seq.convert.scan import Scan, ScanError

__all__ = ["IMAGE_KINDS", "LABEL_FIELDS", "group_key", "list_shard", "looks_like_shard",
           "SplitShards", "WdsSource"]

IMAGE_KINDS = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
LABEL_FIELDS = ("label", "cls")  # in a .json sidecar, first found wins
_SIDECARS = ("cls", "json")
MAX_SIDECAR = 1 << 20  # a label file larger than this is not read: reported
_SHIFT = 44  # a record's position: shard index << _SHIFT | byte offset (shards < 16 TiB)
_INT = re.compile(r"-?[0-9]+")
NEVER_READ = "skipped, never read"


def group_key(name: str) -> Optional[Tuple[str, str]]:
    """(key, kind as spelled) of a member name, or None when it has no ``<key>.<kind>`` form
    (no dot in its file name, or a hidden file ``.x``)."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, kind = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), kind


def _parse_label(kind: str, data: Optional[bytes], size: int):
    """(label or None, class_name or None, why not a label or None) of a sidecar's bytes."""
    if data is None:
        return None, None, f"{size} bytes, too large for a label file"
    if kind == "cls":
        text = data.decode("utf-8", "replace").strip()
        if _INT.fullmatch(text):
            return int(text), None, None
        return None, None, f"holds {text[:40]!r}, not an integer"
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, None, "is not valid JSON"
    if not isinstance(obj, dict):
        return None, None, "is not a JSON object"
    name = obj.get("class_name")
    name = name if isinstance(name, str) else None
    for field in LABEL_FIELDS:
        if field in obj:
            v = obj[field]
            if isinstance(v, int) and not isinstance(v, bool):
                return v, name, None
            return None, name, f"field {field!r} is {json.dumps(v)[:40]}, not an integer"
    return None, name, f"has no {' or '.join(repr(f) for f in LABEL_FIELDS)} field"


def looks_like_shard(path: str, members: int = 16) -> bool:
    """Whether the first ``members`` members of the tar at ``path`` hold a WebDataset group: an
    image beside a ``.cls`` or ``.json`` of the same key. Reads a few headers; False for
    anything unreadable (the tar's own listing names the problem)."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            images, labels = set(), set()
            for _, m in zip(range(members), tf):
                got = group_key(m.name) if m.isfile() else None
                if got is not None:
                    kind = got[1].lower()
                    (images if kind in IMAGE_KINDS else labels if kind in _SIDECARS
                     else set()).add(got[0])
            return bool(images & labels)
    except (OSError, tarfile.TarError):
        return False


def list_shard(path: str, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """The groups of one shard, as JSON-able lists (kept as the listing cache, ``inputs``):

    ``records``: ``[name, offset, size, label]`` per group that is a record (label an int, >= 0,
    not yet checked against a class list); ``rows``: ``[path, reason]`` per group or member
    that is not; ``odd``: ``{kind: [count, first name]}`` of members not used; ``names``:
    ``{label: class_name}`` from the ``.json`` sidecars (first seen); ``labelled``: groups with
    a label file; ``first``: the first member names (for messages).

    Raises:
        ScanError: not a readable tar, compressed, cut short, or a label file unreadable.
    """
    shard = os.path.basename(path)
    labels: Dict[int, tuple] = {}

    def visit(name, off, size, read):
        got = group_key(name)
        if got is not None and got[1].lower() in _SIDECARS:
            labels[off] = _parse_label(got[1].lower(), read() if size <= MAX_SIDECAR else None,
                                       size)
    members, problems = tar_source.list_tar(path, progress, nested=False, visit=visit)
    end = os.path.getsize(path)
    if members and members[-1][1] + members[-1][2] > end:
        raise ScanError(f"{path} ends inside member {members[-1][0]} (the shard is cut short); "
                        "download it again")
    out = {"records": [], "rows": [[raw or name, f"{why} (in {shard})"]
                                   for name, _, raw, why in problems],
           "odd": {}, "names": {}, "labelled": 0, "first": [m[0] for m in members[:3]]}
    seen = set()
    group: List[tuple] = []
    for name, off, size, _ in members + [("", 0, 0, "")]:  # a sentinel closes the last group
        got = group_key(name) if name else None
        if group and (got is None or got[0] != group[0][0]):
            _close(group, shard, seen, labels, out)
            group = []
        if got is not None:
            group.append((got[0], got[1], name, off, size))
        elif name:
            kind = "(hidden file)" if posixpath.basename(name).startswith(".") else \
                "(no extension)"
            _odd(out, kind, name)
    return out


def _odd(out: dict, kind: str, name: str) -> None:
    slot = out["odd"].setdefault(kind, [0, name])
    slot[0] += 1


def _close(group, shard, seen, labels, out) -> None:
    """One group (``(key, kind, name, offset, size)`` members) -> a record or a report row."""
    key = group[0][0]
    images = [g for g in group if g[1].lower() in IMAGE_KINDS]
    cls = [g for g in group if g[1].lower() == "cls"]
    meta = [g for g in group if g[1].lower() == "json"]
    for g in group:
        if g[1].lower() not in IMAGE_KINDS and g[1].lower() not in _SIDECARS:
            _odd(out, "." + g[1].lower(), g[2])
    out["labelled"] += bool(cls or meta)
    if not images and not cls and not meta:
        return  # members of unused kinds only (a stray README.txt): counted as odd, above
    path = images[0][2] if len(images) == 1 else \
        f"{key}.{{{','.join(g[1] for g in group)}}}" if len(group) > 1 else group[0][2]
    kinds = [g[1].lower() for g in group]
    why = None
    if key in seen:
        why = "its key repeats an earlier group of this shard (WebDataset keys are unique)"
    elif len(set(kinds)) < len(kinds):
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        why = f"the group holds {', '.join('.' + k for k in twice)} more than once"
    elif not images:
        why = "the group has no image (.jpg, .jpeg, .png, .webp ...)"
    elif len(images) > 1:
        why = f"the group has {len(images)} images ({', '.join(g[2] for g in images)}); one " \
              "per group"
    elif not cls and not meta:
        why = "the group has no label (.cls, or .json with a \"label\" field)"
    seen.add(key)
    if why is None:
        src = cls[0] if cls else meta[0]
        label, name, bad = labels[src[3]]
        if meta and cls:
            _, name, _ = labels[meta[0][3]]  # the class name, when the .json carries one
        if bad:
            why = f"label file {src[2]} {bad}"
        elif label < 0:
            why = f"label {label} in {src[2]} (negative: no label; timm's shards mark images " \
                  "outside a subset's classes so)"
        else:
            out["records"].append([images[0][2], images[0][3], images[0][4], label])
            if name is not None:
                out["names"].setdefault(str(label), name)
            return
    out["rows"].append([path, f"WebDataset group {key!r}: {why} (in {shard}); {NEVER_READ}"])


class SplitShards:
    """One split's Scan, built shard by shard from the listings (``list_shard``), each listing
    dropped once added: the shards in the order given, the first of a record name stored.

    ``classes``: ``--classes`` (records whose label is outside it are reported as they come),
    or None: the labels seen, known after the last shard (:meth:`scan`).
    """

    def __init__(self, classes: Optional[List[str]], classes_from: str):
        self.classes, self.classes_from = classes, classes_from
        self.shards: List[str] = []
        self.stats: Dict[str, Tuple[int, int]] = {}
        self.entries: List[Tuple[str, int]] = []
        self.rows: List[Tuple[str, str]] = []
        self.odd: Dict[str, list] = {}
        self.names: Dict[int, Tuple[str, str]] = {}  # label -> (.json class_name, shard)
        self.top = -1  # the largest label stored

    def add(self, path: str, listing: dict) -> None:
        k, shard = len(self.shards), os.path.basename(path)
        self.shards.append(path)
        self.rows.extend(tuple(r) for r in listing["rows"])
        for kind, (n, name) in listing["odd"].items():
            self.odd.setdefault(kind, [0, name, shard])[0] += n
        for label, name in listing["names"].items():
            self.names.setdefault(int(label), (name, shard))
        limit = len(self.classes) if self.classes is not None else None
        for name, off, size, label in listing["records"]:
            if name in self.stats:
                first = self.shards[self.stats[name][0] >> _SHIFT]
                self.rows.append((name, f"repeats the name of a record stored from "
                                        f"{os.path.basename(first)} (in {shard}); stored "
                                        f"once, as that one; this copy is {NEVER_READ}"))
                continue
            if limit is not None and label >= limit:
                self.rows.append((name, f"label {label} is outside the class list (0.."
                                        f"{limit - 1} from {self.classes_from}) (in {shard}); "
                                        f"{NEVER_READ}"))
                continue
            self.stats[name] = ((k << _SHIFT) | off, size)
            self.entries.append((name, label))
            self.top = max(self.top, label)

    def scan(self, classes: List[str]) -> Scan:
        """The split's Scan with its class list (every stored label inside it); odd member
        kinds get one report row each, with their count."""
        rows = list(self.rows)
        for kind, (n, name, shard) in sorted(self.odd.items()):
            rows.append((name, f"member kind {kind} is not used: {n} such member"
                               f"{'s' if n > 1 else ''} in this split's shards (the first: "
                               f"this one, in {shard}); {NEVER_READ}"))
        self.entries.sort()
        return Scan(classes, self.entries, rows, self.stats,
                    source=WdsSource(self.shards, self.stats))


class _Offsets:
    """One shard's view of the split's positions: rel -> (offset, size), for its TarSource."""

    def __init__(self, where: Dict[str, Tuple[int, int]]):
        self.where = where

    def __getitem__(self, rel: str) -> Tuple[int, int]:
        pos, size = self.where[rel]
        return pos & ((1 << _SHIFT) - 1), size


class WdsSource:
    """Reads the records of a split's shards (``source_reader.FolderSource``'s contract): one
    ``tar_source.TarSource`` per shard does the ``pread``. A shard's file is opened at its
    first read and closed once the reads have moved on to a later shard and none is in flight
    in it, so a split of thousands of shards holds a few files open."""

    read_ahead = 1  # as a tar: one file at a time, read ahead by the kernel

    def __init__(self, shards: List[str], where: Dict[str, Tuple[int, int]]):
        self.shards = shards
        self.where = where  # rel -> (shard index << _SHIFT | offset, size)
        view = _Offsets(where)
        self._tars = [tar_source.TarSource(p, view, "") for p in shards]
        self._rank = list(range(len(shards)))  # read order of the shards (order())
        self._users = [0] * len(shards)
        self._open: set = set()
        self._lock = threading.Lock()

    def describe(self, rel: str) -> str:
        if not rel:
            return f"{len(self.shards)} WebDataset shards from {self.shards[0]}" \
                if self.shards else "no WebDataset shards"
        return self._tars[self.where[rel][0] >> _SHIFT].describe(rel)

    def order(self, rels: Sequence[str], keys: Sequence[int], method: str):
        """The shards in on-disk order (``disk_order`` of the shard files; ``name``: the order
        given), each front to back."""
        inodes = []
        for p in self.shards:
            try:
                inodes.append(os.stat(p).st_ino)
            except OSError:
                inodes.append(0)  # gone: its first read says so
        ranked, how = disk_order("", self.shards, inodes, method)
        for r, k in enumerate(ranked):
            self._rank[k] = r
        mask = (1 << _SHIFT) - 1
        pos = [self.where[r][0] for r in rels]
        order = sorted(range(len(rels)), key=lambda i: (self._rank[pos[i] >> _SHIFT],
                                                        pos[i] & mask))
        return order, f"shards:{how}"

    def read(self, rel: str):
        k = self.where[rel][0] >> _SHIFT
        with self._lock:
            if k not in self._open:  # the reads moved on: close the shards left behind
                for j in [j for j in self._open
                          if self._rank[j] < self._rank[k] and not self._users[j]]:
                    self._tars[j].close()
                    self._open.discard(j)
                self._open.add(k)
            self._users[k] += 1
        try:
            return self._tars[k].read(rel)
        finally:
            with self._lock:
                self._users[k] -= 1

    def hint(self, rel: str, budget: int):
        """The read-ahead's hint (``source_reader``), passed to the shard's TarSource where it
        has one: (bytes hinted, bytes left, token for ``release``)."""
        k = self.where[rel][0] >> _SHIFT
        hint = getattr(self._tars[k], "hint", None)
        if hint is None:
            return 0, 0, None
        with self._lock:
            self._open.add(k)  # the hint opens it: closed once the reads have passed it
        return hint(rel, budget)

    def release(self, rel: str, token) -> None:
        release = getattr(self._tars[self.where[rel][0] >> _SHIFT], "release", None)
        if release is not None:
            release(rel, token)

    def close(self) -> None:
        with self._lock:
            for j in self._open:
                self._tars[j].close()
            self._open.clear()
