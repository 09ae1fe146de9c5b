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
``epoch``, ``batches`` (of ``epoch`` already handed out), ``image_size``, ``skipped``.

World size: a state saved mid-epoch (``batches > 0``) is refused by a Loader with another
world size or rank (the rest of the epoch was cut for the old one; re-sharding it would need
every rank's state and change what each rank's remaining batches hold). The error says the
ways out: resume with the same world size, or start at the next epoch boundary
(``loader.set_epoch(epoch + 1)``, or a state saved at a boundary, which any world size loads).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

STATE_VERSION = 1

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


def make(loader: Any, epoch: int, batches: int) -> Dict[str, Any]:
    meta = loader.meta
    return {
        "version": STATE_VERSION,
        "format_version": None if meta.legacy else meta.version,
        "path": loader.reader.path, "mode": loader.mode, "num_records": loader.dataset_size,
        "fingerprint": fingerprint(meta),
        "seed": loader.seed, "batch_size": loader.batch_size, "drop_last": loader.drop_last,
        "shuffle": loader.shuffle, "world_size": loader.world_size, "rank": loader.rank,
        "chunk_size": loader.chunk_size, "buffer_size": loader.buffer_size,
        "epoch": int(epoch), "batches": int(batches), "image_size": loader.image_size,
        "skipped": loader.skipped,
    }


def check(sd: Any, mine: Dict[str, Any], total: int) -> None:
    """Raise ValueError naming the first field of ``sd`` that this Loader (``mine``) cannot
    resume from, both values and the way out."""
    if not isinstance(sd, dict) or "version" not in sd:
        raise ValueError(f"load_state_dict got {type(sd).__name__} without a 'version' key; "
                         "expected the dict Loader.state_dict() returned")
    if sd["version"] != STATE_VERSION:
        raise ValueError(f"load_state_dict: state version {sd['version']!r} is unknown (this "
                         f"imagenet_seq reads version {STATE_VERSION}); load it with the "
                         "imagenet_seq version that saved it, or start the epoch again with "
                         "loader.set_epoch(e)")
    missing = [k for k in list(_ALWAYS) + list(_MID_EPOCH) + ["epoch", "batches"]
               if k not in sd]
    if missing:
        raise ValueError(f"load_state_dict: the state lacks {missing}; expected the dict "
                         "Loader.state_dict() returned")
    for key in ("epoch", "batches"):
        if isinstance(sd[key], bool) or not isinstance(sd[key], int):
            raise ValueError(f"load_state_dict: {key}={sd[key]!r}; expected an int (the dict "
                             "Loader.state_dict() returned)")
    fields = dict(_ALWAYS)
    if sd["batches"] > 0:
        fields.update(_MID_EPOCH)
    for key, fix in fields.items():
        if sd[key] != mine[key]:
            where = f" (saved from {sd.get('path')})" if key in ("fingerprint", "num_records",
                                                                 "mode") else ""
            raise ValueError(f"load_state_dict: {key} differs: the state has {sd[key]!r}{where}, "
                             f"this Loader has {mine[key]!r}; {fix}")
    if sd["epoch"] < 0 or not 0 <= sd["batches"] <= total:
        raise ValueError(f"load_state_dict: epoch={sd['epoch']!r}, batches={sd['batches']!r}; "
                         f"expected epoch >= 0 and 0 <= batches <= {total} (len(loader))")
