"""Where a split's conversion stands when it starts: what earlier runs left, and the state.

:func:`existing` looks at every file of the split in the layout's folders (``shards``):
another layout's files are refused (or deleted with --overwrite); this layout's finished split
is kept for --resume or refused; its unfinished files are resumed, refused or deleted.
:func:`resume_point` finds the progress record (``shard_sink``: the lowest-numbered .partial
holding one; a finished .partial before it, killed before its rename, is renamed here) and
checks it against this run (inputs, options, shard count and folders, the runs' folder).
"""
from __future__ import annotations

import json
import os
import shlex
import uuid
from typing import List

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets
from imagenet_seq.format.convlock import ABANDONED
from imagenet_seq.format.lmdbfile import DamagedFile
from imagenet_seq.convert.passes import ConversionError
from imagenet_seq.convert.shard_sink import seal
from imagenet_seq.convert.shards import Layout, foreign_error, remove_files, split_files

__all__ = ["open_partial", "existing", "fresh_state", "resume_point"]


def open_partial(path: str, way_out: str, **kw):
    """``fmt.open_env``, whose size check refuses a file shorter than its LMDB header says
    (LMDB would SIGBUS on it), as a ConversionError the CLI prints with ``way_out``."""
    try:
        return fmt.open_env(path, **kw)
    except DamagedFile as e:
        raise ConversionError(f"{e}. {way_out}") from None


def _adopt_runs(old: str, run_dir: str) -> bool:
    """Whether the runs recorded at ``old`` were moved to ``run_dir`` (the output folder, or
    --tmp, moved as a whole): they are used there; ``prepare_runs`` checks every size."""
    return old != run_dir and os.path.isdir(run_dir) and not os.path.exists(old)


def existing(layout: Layout, run_dir: str, overwrite: bool, resume: bool) -> bool:
    """What earlier conversions left of this split: another layout's files are refused (or,
    with ``overwrite``, deleted); this layout's are kept for ``resume``, refused or deleted
    (a one-file split stays until its replacement is renamed over it, as it always did).
    Returns whether the split is complete here."""
    own = layout.own(run_dir)
    found = split_files(layout)
    foreign = [p for p in found if os.path.realpath(p) not in own]
    if foreign:
        if not overwrite:
            raise ConversionError(foreign_error(layout, foreign))
        remove_files(foreign)
    done = layout.final(0) if layout.count == 1 else layout.manifest
    if os.path.exists(done):
        if resume and not overwrite:
            return True
        if not overwrite:
            raise ConversionError(f"{done} already exists; pass --overwrite to replace it "
                                  "(or --resume to keep it and finish the other splits)")
    if resume:
        return False
    mine = [p for p in found if p not in foreign]  # this layout's, where it puts them
    unfinished = [p for p in mine if p.endswith(".partial")
                  or layout.count > 1 and p.endswith(".lmdb")]
    if unfinished and not overwrite:
        raise ConversionError(f"{unfinished[0]} is an unfinished conversion; {ABANDONED}. "
                              "Pass --resume to continue it or --overwrite to start over")
    one = os.path.realpath(layout.final(0)) if layout.count == 1 else None
    remove_files([p for p in mine if os.path.realpath(p) != one] + [run_dir])
    return False


def fresh_state(fp: str, layout: Layout, run_dir: str) -> dict:
    """Pass 1's state: the sweep's cursor (``passes.read_pass``), no list over the files."""
    return {"fingerprint": fp, "phase": "read", "run_dir": run_dir, "runs": [],
            "sweep": {"seq": 0, "token": None}, "written": 0, "bytes": 0, "converted": 0,
            "skipped": 0, "found": {"classes": [], "containers": {}, "flags": []},
            "split_id": uuid.uuid4().hex,
            "layout": {"count": layout.count, "folders": layout.used_folders},
            "shard": {"index": 0, "first": 0, "bytes": 0}}


def _check_state(state: dict, j: int, partial: str, fp: str, layout: Layout,
                 run_dir: str) -> dict:
    """A resumed progress record: the same inputs, options and layout, its runs found."""
    if state.get("fingerprint") != fp:
        raise ConversionError(
            f"{partial} was started with other inputs or options (file list, seed, "
            "--max-size or --quality differ); run with the same ones, or pass "
            "--overwrite to start over")
    if "phase" not in state or "sweep" not in state and state["phase"] == "read":
        raise ConversionError(
            f"{partial} was started by an older version of the converter (one "
            "pass, no sorted runs); pass --overwrite to start over")
    # a one-file .partial of the version before shards: the one file's state
    state.setdefault("split_id", uuid.uuid4().hex)
    state.setdefault("shard", {"index": 0, "first": 0, "bytes": 0})
    layout_now = {"count": layout.count, "folders": layout.used_folders}
    state.setdefault("layout", layout_now)
    if state["layout"] != layout_now or state["shard"]["index"] != j:
        raise ConversionError(
            f"{partial} was started with {state['layout']['count']} shard(s) over the folders "
            f"{', '.join(state['layout']['folders'])} ('.' = the output folder); this run "
            f"writes {layout.count} over {', '.join(layout_now['folders'])}: run with the "
            "same --shards/--shard-gb and --shard-dirs to continue it, or --overwrite to "
            "start over")
    if _adopt_runs(state["run_dir"], run_dir):
        state["run_dir"] = run_dir  # committed with the next progress record
    elif state["run_dir"] != run_dir:
        raise ConversionError(
            f"{partial} keeps its temporary runs in {state['run_dir']}; pass --tmp "
            f"{os.path.dirname(state['run_dir'])} to continue it (or move that "
            f"folder: `mv {shlex.quote(state['run_dir'])} {shlex.quote(run_dir)}`), "
            "or --overwrite to start over")
    return state


def resume_point(layout: Layout, classes: List[str], content: dict, fp: str, run_dir: str):
    """Where a resumed conversion stands: ``(shard j, its open env, inode, state)``; state
    None: start afresh at shard 0; j == K: every shard is finished (shard_sink: the state is
    in the lowest-numbered .partial holding a progress record; the finished .partial before
    it, killed before its rename, is renamed here)."""
    for j in range(layout.count):
        partial = layout.partial(j)
        if not os.path.exists(partial):
            if os.path.exists(layout.final(j)):
                continue
            if j == 0:
                break
            raise ConversionError(
                f"shard {j} of {layout.count} ({layout.name(j)}) is neither finished nor "
                f"being written in {layout.folder(j)}, though shard {j - 1} is finished: was "
                "the conversion started with other --shard-dirs, or the file moved? Run with "
                "the --shard-dirs it was started with, or pass --overwrite to start over")
        env = open_partial(partial, f"It is an unfinished conversion: delete {partial} and "
                           "convert again (or pass --overwrite instead of --resume)",
                           readonly=False, lock=False)
        ino = os.stat(partial).st_ino
        try:
            with env.begin() as txn:
                raw = txn.get(fmt.PROGRESS_KEY)
                if raw is not None:
                    return j, env, ino, _check_state(json.loads(bytes(raw)), j, partial, fp,
                                                     layout, run_dir)
                finished = has_offsets = None
                if txn.get(fmt.META_KEY) is not None:  # killed just before the rename
                    finished = fmt.read_metadata(txn, partial)
                    has_offsets = txn.get(offsets.OFFSETS_KEY) is not None
                elif txn.stat()["entries"] and txn.get(fmt.record_key(0)) is not None:
                    raise ConversionError(f"{partial} holds records but no progress record; "
                                          "pass --overwrite to start over")
        except BaseException:
            env.close()
            raise
        if finished is None:
            if j == 0:
                return 0, env, ino, None  # made, killed before its first commit
            env.close()
            raise ConversionError(f"{partial} is empty, but shard {j - 1} is finished: this "
                                  "conversion's progress record is lost; pass --overwrite to "
                                  "start over")
        if (classes is not None and finished.classes != classes) or \
                finished.options != content:
            env.close()
            raise ConversionError(
                f"{partial} is a finished conversion of other inputs or options (classes, "
                "seed, --max-size or --quality differ); run with the same ones, or pass "
                "--overwrite to start over")
        seal(env, partial, ino, finished.num_records, has_offsets)
    else:
        return layout.count, None, None, None
    return 0, None, None, None
