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

This module holds those rules (a member's group key, a label file's label, whether a tar
looks like a shard); ``wds_sweep`` applies them as it reads each shard in one sweep.
"""
from __future__ import annotations

import json
import posixpath
import re
import tarfile
from typing import Optional, Tuple

from imagenet_seq.convert.images import IMAGE_EXTENSIONS

__all__ = ["IMAGE_KINDS", "LABEL_FIELDS", "SIDECARS", "MAX_SIDECAR", "group_key",
           "parse_label", "looks_like_shard"]

IMAGE_KINDS = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
LABEL_FIELDS = ("label", "cls")  # in a .json sidecar, first found wins
SIDECARS = ("cls", "json")
MAX_SIDECAR = 1 << 20  # a label file larger than this is not read: reported
_INT = re.compile(r"-?[0-9]+")


def group_key(name: str) -> Optional[Tuple[str, str]]:
    """(key, kind as spelled) of a member name, or None when it has no ``<key>.<kind>`` form
    (no dot in its file name, or a hidden file ``.x``)."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, kind = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), kind


def parse_label(kind: str, data: Optional[bytes], size: int):
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
                    (images if kind in IMAGE_KINDS else labels if kind in SIDECARS
                     else set()).add(got[0])
            return bool(images & labels)
    except (OSError, tarfile.TarError):
        return False
