"""How much a split's conversion writes, and where: stated, and checked against free space
before anything is read.

The runs (temporary, about the sources' size) go to the runs' folder (``--tmp``, default the
output folder); the output (about as much again) to the output folder or, sharded, to the
shards' folders (``shards.Layout``). Everything on one disk (``st_dev``) counts together.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional, Tuple

from imagenet_seq import format as fmt
from imagenet_seq.convert import passes  # its MAX_RUNS and buffer_bytes (tests patch them)
from imagenet_seq.convert.passes import ConversionError
from imagenet_seq.convert.shards import Layout
from imagenet_seq.convert.sort_runs import HEAD as RUN_HEAD
from imagenet_seq.format import manifest as mf

__all__ = ["outputs", "space_check", "shard_estimates"]


def space_check(src: int, est: int, state, run_dir: str,
                outputs: List[Tuple[str, int, Optional[str]]], split: str, images: int,
                memory: int, workers: int, notice) -> int:
    """Temporary and output bytes this split still needs, stated, and checked against free
    space before anything is read; so is the number of runs the memory bound implies.

    ``est``: the runs' estimated size; ``outputs``: ``(folder, bytes still to be written
    there, what: None for the one .lmdb file, else which shards)``. Everything on one disk
    (``st_dev``) counts together: an output folder on another disk than the runs is checked
    first, then the runs' folder with the output on its disk, then each output folder on that
    disk against its own free space (a quota or subvolume may give it less).
    Returns ``est``."""
    tmp = os.path.dirname(run_dir)
    have = sum(r[2] for r in state.get("runs", []))
    need_tmp = 0 if state.get("phase") == "merge" else max(0, est - have)
    tdev, rtmp = os.stat(tmp).st_dev, os.path.realpath(tmp)
    devs = [os.stat(folder).st_dev for folder, _, _ in outputs]
    on_dev: dict = {}
    for dev, (_, need, _) in zip(devs, outputs):
        on_dev[dev] = on_dev.get(dev, 0) + need
    same = on_dev.get(tdev, 0)
    free = shutil.disk_usage(tmp).free
    frees = [free if os.path.realpath(folder) == rtmp else shutil.disk_usage(folder).free
             for folder, _, _ in outputs]
    if notice:
        notice(f"{split}: " + (f"{images} images" if images else "images counted as the "
                                "archive is read (one sweep)")
               + f", {src / 1e9:.2f} GB of sources; temporary runs "
               f"~{est / 1e9:.2f} GB in {run_dir} (deleted at the end), "
               f"{free / 1e9:.1f} GB free there"
               + "".join(f"; output ~{need / 1e9:.2f} GB in {folder}"
                         + (f" ({what})" if what else "") + f", {f / 1e9:.1f} GB free there"
                         for (folder, need, what), dev, f in zip(outputs, devs, frees)
                         if dev != tdev or what)
               + f"; buffers <= {memory / 1e9:.2f} GB")
    try:
        buf = passes.buffer_bytes(memory, workers, images)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    runs = -(-int(est * 1.1) // buf)  # +10%: re-encoded images
    if runs > passes.MAX_RUNS:
        least = (int(est * 1.1) // passes.MAX_RUNS + passes.fixed_bytes(workers, images))
        raise ConversionError(
            f"{split}: about {est / 1e9:.1f} GB in runs of "
            f"{buf / 1e9:.2f} GB makes ~{runs} runs, more than the "
            f"{passes.MAX_RUNS} one merge reads at once; pass --memory-mb "
            f"{least // 1_000_000 + 1} or more")
    for (folder, need, what), dev, f in zip(outputs, devs, frees):
        if dev != tdev and on_dev[dev] > f:  # an output disk without the runs: first
            raise ConversionError(
                f"too little space for the output of {split}: about "
                f"{on_dev[dev] / 1e9:.2f} GB needed in {folder} ({what or 'the .lmdb file'}"
                + ("" if on_dev[dev] == need else " and the output folders on the same disk")
                + f"; the sorted runs go to {tmp}), {f / 1e9:.2f} GB free; free space there "
                "or pass an output folder on a disk with room, then run again (--resume "
                "continues an interrupted run)")
    need = need_tmp + same
    if need > free:
        raise ConversionError(
            f"too little temporary space for {split}: about {need / 1e9:.2f} GB needed in "
            f"{tmp} (sorted runs {need_tmp / 1e9:.2f} GB"
            + (f" + the output {same / 1e9:.2f} GB on the same disk" if same else "")
            + f"), {free / 1e9:.2f} GB free; free space there or pass --tmp DIR on a disk "
            "with room, then run again (--resume continues an interrupted run)")
    for (folder, need_f, what), dev, f in zip(outputs, devs, frees):
        if dev == tdev and os.path.realpath(folder) != rtmp and need > f:
            raise ConversionError(
                f"too little space for the output of {split}: about {need / 1e9:.2f} GB "
                f"needed on the disk of {folder} ({what or 'the .lmdb file'} "
                f"{need_f / 1e9:.2f} GB, with the sorted runs in {tmp} and the other output "
                f"on that disk), {f / 1e9:.2f} GB free there; free space there or leave the "
                "folder out (--shard-dirs), then run again (--resume continues an "
                "interrupted run)")
    return est


def outputs(layout: Layout, per: List[int], state: dict, j: int):
    """(folder, bytes still to be written there, which shards) for :func:`space_check`."""
    by_folder: dict = {}
    for i in range(j, layout.count):
        need = per[i]
        if i == j and state["phase"] == "merge":
            need = max(0, need - state["shard"]["bytes"])
        entry = by_folder.setdefault(layout.folder(i), [0, []])
        entry[0] += need
        entry[1].append(str(i))
    return [(folder, need, None if layout.count == 1 else
             f"shard{'s' if len(idx) > 1 else ''} {', '.join(idx)} of {layout.count}")
            for folder, (need, idx) in by_folder.items()]


def shard_estimates(src_bytes: int, images: Optional[int], count: int) -> List[int]:
    """Each shard's estimated bytes (records and their headers) from the sources' bytes and
    the image count (``None``: an archive's, estimated at ~100 KB per image)."""
    n_est = images if images is not None else max(1, src_bytes // 100_000)
    return [src_bytes * n // max(1, n_est) + n * (RUN_HEAD.size + fmt.RECORD_HEADER.size)
            for _, n in mf.shard_ranges(n_est, count)]
