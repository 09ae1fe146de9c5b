"""Which shards of a split share a device: one reader (one read-ahead) per group.

Shards on one disk must be read by one reader (two streams on one HDD turn sequential reads
into seeks); shards on different disks are read at the same time. By default a shard's group
is its file's ``st_dev``. That is wrong in two cases, which the override settles:

* two partitions (or LVM volumes) of one disk have two ``st_dev`` but one actuator:
  ``"one"`` (every shard in one group), or labels per shard;
* one filesystem over several disks (a btrfs/ZFS pool, mergerfs) has one ``st_dev`` for
  folders on different disks: ``"folder"`` (a group per shard folder), or labels per shard.

The override is the Loader's ``shard_devices`` argument, else the environment variable
``IMAGENET_SEQ_SHARD_DEVICES`` (so tools and the node reader follow it too): ``"device"``
(the default), ``"folder"``, ``"one"``, or one label per shard (a sequence, or in the variable
comma-separated, e.g. ``0,1,0,1``): shards with equal labels share a group.
"""
from __future__ import annotations

import os
from typing import Any, Hashable, List, Optional, Sequence, Tuple, Union

__all__ = ["SHARD_DEVICES_ENV", "GROUPINGS", "check_grouping", "group_shards", "describe"]

SHARD_DEVICES_ENV = "IMAGENET_SEQ_SHARD_DEVICES"
GROUPINGS = ("device", "folder", "one")

Grouping = Union[None, str, Tuple[Hashable, ...]]


def check_grouping(value: Any, name: str = "shard_devices") -> Grouping:
    """``value`` as a grouping (None, one of :data:`GROUPINGS`, or a tuple of labels), else a
    ValueError naming ``name``, the value and what is allowed."""
    if value is None or (isinstance(value, str) and value in GROUPINGS):
        return value
    if isinstance(value, str):
        labels = tuple(x.strip() for x in value.split(","))
        if len(labels) > 1 and all(labels):  # 'devcie' is a typo, not one label
            return labels
    elif isinstance(value, (list, tuple)) and value:
        try:
            for x in value:
                hash(x)
        except TypeError:
            pass
        else:
            return tuple(value)
    raise ValueError(f"{name}={value!r}; expected None (by the device each shard's file is on), "
                     f"{', '.join(map(repr, GROUPINGS))}, or one label per shard (e.g. "
                     "[0, 1, 0, 1]; in the environment '0,1,0,1'): shards with one label "
                     "share one reader")


def group_shards(paths: Sequence[str], grouping: Grouping = None) -> List[List[int]]:
    """The shards ``paths`` (split order) in device groups: ``[[shard index, ...], ...]``,
    groups in the order of their first shard. ``grouping`` None: the environment's
    (:data:`SHARD_DEVICES_ENV`), else ``"device"``.

    Raises:
        ValueError: a grouping that is not one, or labels that are not one per shard.
    """
    source = "shard_devices"
    if grouping is None and os.environ.get(SHARD_DEVICES_ENV):
        source = SHARD_DEVICES_ENV
        grouping = check_grouping(os.environ[SHARD_DEVICES_ENV], source)
    grouping = check_grouping(grouping, source) or "device"
    if grouping == "one":
        keys: Sequence[Hashable] = [0] * len(paths)
    elif grouping == "device":
        keys = [os.stat(p).st_dev for p in paths]
    elif grouping == "folder":
        keys = [os.path.dirname(os.path.realpath(p)) for p in paths]
    else:
        if len(grouping) != len(paths):
            raise ValueError(f"{source}={grouping!r} gives {len(grouping)} labels for "
                             f"{len(paths)} shards; give one label per shard, in shard order")
        keys = list(grouping)
    groups: List[List[int]] = []
    where: dict = {}
    for j, key in enumerate(keys):
        if key not in where:
            where[key] = len(groups)
            groups.append([])
        groups[where[key]].append(j)
    return groups


def describe(groups: List[List[int]], paths: Sequence[str]) -> Optional[str]:
    """One line naming the groups (None for one group): for logs and tools."""
    if len(groups) < 2:
        return None
    parts = [", ".join(os.path.basename(paths[j]) for j in g) for g in groups]
    return f"{len(groups)} readers: " + "; ".join(f"[{p}]" for p in parts)
