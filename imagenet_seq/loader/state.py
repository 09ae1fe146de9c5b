"""A Loader's resume state: what ``state_dict()`` saves and ``load_state_dict()`` checks.

The state is small (no record bytes, no buffer contents): the order of an epoch is a pure
function of (seed, epoch, rank, world size, chunk size, buffer size) and the augmentation of
a record a function of (seed, epoch, record), so "batch ``k`` of epoch ``e``" pins down every
later batch -- records, labels, pixels and boundaries. Restoring replays the plan and the
shuffle buffer on record ids (no data; ~1 s per million records) and reads again only the
records the buffer held at that point (at most ``buffer_size``).

Fields: ``version`` (of this layout), ``format_version`` and ``split`` (path, mode,
``num_records`` and a fingerprint of the file's metadata), ``seed``, ``batch_size``,
``drop_last``, ``shuffle``, ``world_size``, ``rank``, ``chunk_size``, ``buffer_size``,
``epoch``, ``batches`` (of ``epoch`` already handed out), ``image_size``, ``skipped``,
``plan`` (:data:`~imagenet_seq.plan.stage.RANK_PLAN`, or the node plan's ``node.PLAN`` when
the Loader reads through one reader per node) and ``local_world_size`` (the node plan's
nodes). A state without ``plan`` (saved before it existed) is today's per-rank plan.

Checks (:func:`check`): every field must be present, of its type and in its range -- ints are
ints (``True`` is not an int, ``'3'`` is not one), flags are ``True``/``False``, ``epoch``,
``seed``, ``skipped``, ``buffer_size`` >= 0, ``rank`` < ``world_size``, ``batches`` at most
``len(loader)``, ``image_size`` at most ``MAX_IMAGE_SIZE`` (4096) -- else a ValueError naming
the field, its value and what is allowed; then the fields that fix the epoch must equal this
Loader's. Keys beyond these fields are ignored.

World size: a state saved mid-epoch (``batches > 0``) is refused by a Loader with another
world size or rank (the rest of the epoch was cut for the old one; re-sharding it would need
every rank's state and change what each rank's remaining batches hold). The error says the
ways out: resume with the same world size, or start at the next epoch boundary
(``loader.set_epoch(epoch + 1)``, or a state saved at a boundary, which any world size loads).
The same holds for the plan: a mid-epoch state of the node plan resumes only with the node
reader on and the same ``local_world_size``, one of today's plan only with it off.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from imagenet_seq.format import SPLITS
from imagenet_seq.loader.config import MAX_IMAGE_SIZE, Settings
from imagenet_seq.plan.stage import RANK_PLAN

__all__ = ["STATE_VERSION", "Position", "Cursor", "fingerprint", "make", "check"]

STATE_VERSION = 1
_WAY_OUT = ("save it again with loader.state_dict(), or start the epoch again with "
            "loader.set_epoch(e)")

# fields that must match whenever a state is loaded, with the way out when they do not
_ALWAYS = {
    "format_version": "convert the split again with this imagenet_seq, or install the version "
                      "that saved the state",
    "mode": "load the state into a Loader of the split it was saved from",
    "fingerprint": "load the state into a Loader of the file it was saved from (the file was "
                   "replaced or re-converted: start the epoch again with loader.set_epoch(e))",
    "num_records": "load the state into a Loader of the file it was saved from",
    "seed": "create the Loader with the seed of the run you resume",
    "batch_size": "create the Loader with the batch size of the run you resume",
    "drop_last": "create the Loader with the drop_last of the run you resume",
    "shuffle": "create the Loader with the shuffle setting of the run you resume",
}
# fields that fix the rest of an epoch: checked only for a state saved mid-epoch
_MID_EPOCH = {
    "world_size": "resume on as many ranks as the run had, or start the next epoch "
                  "(loader.set_epoch(epoch + 1)) on the new world size: a mid-epoch state is "
                  "not re-sharded",
    "rank": "give each rank the state that rank saved (save one state per rank)",
    "chunk_size": "create the Loader with the chunk_size of the run you resume",
    "buffer_size": "create the Loader with the buffer_size (or buffer_bytes) of the run you "
                   "resume",
}


def fingerprint(meta: Any) -> str:
    """A short hash of a split's metadata (classes, counts, sizes, order, options)."""
    d = {k: v for k, v in vars(meta).items() if k not in ("legacy",)}
    raw = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class Position:
    """Where a pass is: its epoch and the batches it has handed out (what a resume needs)."""

    epoch: int
    batches: int


class Cursor:
    """Where a Loader stands between passes: the epoch the next pass takes (``set_epoch``, or
    the next number), a resume point (``load_state_dict``) and the last pass's
    :class:`Position` (shared with that pass's iterator, which moves it on)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.fixed = False  # set_epoch was called: passes do not number themselves
        self.resume: Optional[Tuple[int, int]] = None  # (epoch, batch) the next pass starts at
        self.position: Optional[Position] = None

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch={epoch}; expected >= 0")
        if self.resume is not None and self.resume[0] != int(epoch):
            self.resume = None
        self.epoch = int(epoch)
        self.fixed = True

    def start_pass(self) -> Tuple[int, int]:
        """``(epoch, first batch)`` of a pass that starts now; the next one takes the next
        epoch unless ``set_epoch`` fixed it."""
        epoch, start = self.epoch, 0
        if self.resume is not None and self.resume[0] == epoch:
            start = self.resume[1]
        self.resume = None
        if not self.fixed:
            self.epoch += 1
        return epoch, start

    def saved(self, total: int) -> Tuple[int, int]:
        """``(epoch, batches)`` to save: mid-pass, the pass's; after a complete pass (``total``
        batches), the next epoch (or the one ``set_epoch`` chose since) at batch 0."""
        pos = self.position
        if self.resume is not None:
            return self.resume
        if pos is not None and pos.batches < total:
            return pos.epoch, pos.batches
        if pos is not None:
            return max(pos.epoch + 1, self.epoch), 0
        return self.epoch, 0

    def restore(self, epoch: int, batches: int) -> None:
        self.epoch = epoch
        self.resume = (epoch, batches) if batches else None
        self.position = None


def make(settings: Settings, epoch: int, batches: int, finish: Dict[str, int]) -> Dict[str, Any]:
    """The state of a Loader with ``settings`` at batch ``batches`` of ``epoch``; ``finish``:
    the finish stage's state (its skip count)."""
    data, plan, order = settings.data, settings.order.plan, settings.order
    meta = data.meta
    return {
        "version": STATE_VERSION,
        "format_version": None if meta.legacy else meta.version,
        "path": data.path, "mode": data.mode,
        "num_records": int(data.num_records),
        "fingerprint": fingerprint(meta),
        "seed": int(plan.seed), "batch_size": int(order.batch_size),
        "drop_last": bool(order.drop_last), "shuffle": bool(plan.shuffle),
        "world_size": int(plan.world_size), "rank": int(plan.rank),
        "chunk_size": int(plan.chunk_size), "buffer_size": int(plan.buffer_size),
        "epoch": int(epoch), "batches": int(batches),
        "image_size": int(settings.decode.image_size), "skipped": int(finish["skipped"]),
        "plan": plan.name, "local_world_size": int(order.local_world_size),
    }


def _plan_of(sd: Dict[str, Any]) -> str:
    """The plan a state was saved under, with the nodes' size when it is the node plan."""
    name = sd.get("plan", RANK_PLAN)
    return name if name == RANK_PLAN else f"{name} (local_world_size={sd.get('local_world_size')})"


def _check_plan(sd: Dict[str, Any], mine: Dict[str, Any]) -> None:
    """A mid-epoch state resumes only under the plan it was cut for."""
    if _plan_of(sd) == _plan_of(mine):
        return
    node_now = mine["plan"] != RANK_PLAN
    raise ValueError(
        f"load_state_dict: plan differs: the state was saved under {_plan_of(sd)}, this Loader "
        f"plans {_plan_of(mine)} (the node reader is {'on' if node_now else 'off'} here); "
        "resume with the setting of the run you resume (Loader(node_reader=...), "
        "IMAGENET_SEQ_NODE_READER, the same ranks per node), or start the next epoch "
        "(loader.set_epoch(epoch + 1)): a state saved at an epoch boundary loads under any plan")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _int_in(low: int, high: Optional[int] = None) -> Tuple[Callable[[Any], bool], str]:
    if high is None:
        return (lambda v: _is_int(v) and v >= low), f"an int >= {low}"
    return (lambda v: _is_int(v) and low <= v <= high), f"an int in {low}..{high}"


_BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "True or False")
_STR = (lambda v: isinstance(v, str), "a str")


def _fields(sd: Dict[str, Any], total: int) -> Dict[str, Tuple[Callable[[Any], bool], str]]:
    """Every field of a state: (test, what it allows). ``total`` = ``len(loader)``."""
    world = sd.get("world_size")
    return {
        "version": _int_in(STATE_VERSION, STATE_VERSION),
        "format_version": (lambda v: v is None or _is_int(v),
                           "an int, or None (a file of the original tool)"),
        "path": _STR,
        "mode": (lambda v: isinstance(v, str) and v in SPLITS,
                 f"one of {', '.join(map(repr, SPLITS))}"),
        "num_records": _int_in(0),
        "fingerprint": _STR,
        "seed": _int_in(0),
        "batch_size": _int_in(1),
        "drop_last": _BOOL,
        "shuffle": _BOOL,
        "world_size": _int_in(1),
        "rank": _int_in(0, world - 1) if _is_int(world) and world >= 1 else _int_in(0),
        "chunk_size": _int_in(1),
        "buffer_size": _int_in(0),
        "epoch": _int_in(0),
        "batches": (_int_in(0, total)[0], f"an int with 0 <= batches <= {total} (len(loader))"),
        "image_size": _int_in(1, MAX_IMAGE_SIZE),
        "skipped": _int_in(0),
    }


def check(sd: Any, mine: Dict[str, Any], total: int) -> None:
    """Raise ValueError naming the first field of ``sd`` that this Loader (``mine``) cannot
    resume from: a field missing, of the wrong type or outside its range (its name, its value
    and what is allowed: an edited or damaged state), or one that differs from this Loader's
    (both values and the way out). Keys beyond the fields are ignored."""
    if not isinstance(sd, dict) or "version" not in sd:
        raise ValueError(f"load_state_dict got {type(sd).__name__} without a 'version' key; "
                         "expected the dict Loader.state_dict() returned")
    if sd["version"] != STATE_VERSION or not _is_int(sd["version"]):
        raise ValueError(f"load_state_dict: state version {sd['version']!r} is unknown (this "
                         f"imagenet_seq reads version {STATE_VERSION}); load it with the "
                         "imagenet_seq version that saved it, or start the epoch again with "
                         "loader.set_epoch(e)")
    fields = _fields(sd, total)
    missing = [k for k in fields if k not in sd]
    if missing:
        raise ValueError(f"load_state_dict: the state lacks {missing}; expected the dict "
                         "Loader.state_dict() returned")
    for key, (ok, allowed) in fields.items():
        if key != "batches" and not ok(sd[key]):
            raise ValueError(f"load_state_dict: {key}={sd[key]!r}; expected {allowed} (the "
                             f"state was edited or damaged: {_WAY_OUT})")
    if not _is_int(sd["batches"]):
        raise ValueError(f"load_state_dict: batches={sd['batches']!r}; expected an int (the "
                         f"state was edited or damaged: {_WAY_OUT})")
    compare = dict(_ALWAYS)
    if sd["batches"] > 0:
        if not isinstance(sd.get("plan", RANK_PLAN), str):
            raise ValueError(f"load_state_dict: plan={sd['plan']!r}; expected a str (the state "
                             f"was edited or damaged: {_WAY_OUT})")
        _check_plan(sd, mine)  # before the fields the plan changes (buffer_size's default)
        compare.update(_MID_EPOCH)
    for key, fix in compare.items():
        if sd[key] != mine[key]:
            where = f" (saved from {sd.get('path')})" if key in ("fingerprint", "num_records",
                                                                 "mode") else ""
            raise ValueError(f"load_state_dict: {key} differs: the state has {sd[key]!r}{where}, "
                             f"this Loader has {mine[key]!r}; {fix}")
    ok, allowed = fields["batches"]
    if not ok(sd["batches"]):
        raise ValueError(f"load_state_dict: epoch={sd['epoch']!r}, batches={sd['batches']!r}; "
                         f"expected {allowed} (the state was edited or damaged: {_WAY_OUT})")
