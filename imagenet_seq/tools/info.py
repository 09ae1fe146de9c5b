"""``imagenet-seq-info`` / ``python -m imagenet_seq``: what this installation can do, and why not.

Optional parts install silently or not at all (the crop-decode C extension needs the libjpeg-turbo
headers at ``pip install`` time; python-prctl needs libcap headers; DALI and CUDA need their
wheels and a driver). This report says which are on, which are off and the command that turns
them on, plus the versions and the Loader's defaults on this machine (decode workers, shuffle
buffer). ``summary_line()`` is its one-line form, printed by the demo and the bench.
``imagenet-seq-info ROOT`` adds the splits converted in ROOT (:func:`splits_report`): each
one's files (one, or its shards with their folders), records and GB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional, Sequence

PRCTL_PIP = 'apt-get install libcap-dev && pip install "imagenet_seq[prctl]"'
DALI_PIP = 'pip install "imagenet_seq[dali]"'

__all__ = ["crop_decode_status", "runtime_report", "summary_line", "format_report",
           "splits_report", "format_splits", "main"]


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def crop_decode_status() -> Dict[str, Any]:
    """Whether train crops are decoded alone (:mod:`imagenet_seq.decode._jpegcrop`), and why not."""
    from imagenet_seq.decode import transforms

    if transforms._jpegcrop is not None:
        return {"on": True, "why": "C extension built against the system libjpeg-turbo"}
    return {"on": False, "why": f"C extension not built ({transforms.JPEGCROP_ERROR}); train "
                                f"crops decode the whole image with OpenCV (same pixels, "
                                f"~1.15x slower): {transforms.CROP_DECODE_FIX}"}


def _prctl_status() -> Dict[str, Any]:
    try:
        import prctl  # noqa: F401  (python-prctl)
        return {"on": True, "why": "python-prctl: workers die with the trainer (PR_SET_PDEATHSIG)"}
    except ImportError:
        pass
    if sys.platform.startswith("linux"):
        return {"on": True, "why": "python-prctl not installed; the same prctl call goes via "
                                   f"ctypes (nothing lost; optional: {PRCTL_PIP})"}
    return {"on": False, "why": "not Linux: workers stop when the trainer shuts down cleanly"}


def _dali_status() -> Dict[str, Any]:
    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"):
        v = _version(dist)
        if v:
            return {"on": True, "why": f"{dist} {v}: Loader(..., decoder='dali')"}
    return {"on": False, "why": f"not installed (GPU JPEG decoding, optional: {DALI_PIP})"}


def _cuda_status() -> Dict[str, Any]:
    import torch

    built = torch.version.cuda
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return {"on": True, "devices": n, "why": f"{n} device(s), {torch.cuda.get_device_name(0)}"
                                                f" (torch built for CUDA {built})"}
    return {"on": False, "devices": 0,
            "why": "no CUDA device visible" + (f" (torch built for CUDA {built})" if built
                                               else " (CPU build of torch)")
                   + "; training runs on the CPU (examples/imagenet/main.py --device cpu)"}


def runtime_report() -> Dict[str, Any]:
    """Versions, optional parts (on/off and why) and the Loader's defaults on this machine."""
    import imagenet_seq
    from imagenet_seq.loader.config import default_workers
    from imagenet_seq.loader.ranks import resolve_rank
    from imagenet_seq.plan.shuffle import (DEFAULT_NODE_BUFFER_BYTES,
                                           IMAGENET_MEAN_RECORD_BYTES, buffer_records)

    versions = {"python": platform.python_version(), "imagenet_seq": imagenet_seq.__version__}
    for dist in ("torch", "torchvision", "numpy", "opencv-python-headless", "lmdb", "pillow",
                 "tensorpack", "timm", "lightning"):
        versions[dist] = _version(dist)
    if versions["opencv-python-headless"] is None:
        versions["opencv-python-headless"] = _version("opencv-python")
    local = resolve_rank().local_world_size
    buffer_bytes = DEFAULT_NODE_BUFFER_BYTES // max(1, local)
    return {
        "versions": versions,
        "crop_decode": crop_decode_status(),
        "prctl": _prctl_status(),
        "dali": _dali_status(),
        "cuda": _cuda_status(),
        "cpus": default_workers(1),  # one rank's workers: every CPU this process may use
        "ranks_on_this_machine": local,
        "default_workers": default_workers(local),
        "default_buffer_bytes": buffer_bytes,
        "default_buffer_records_imagenet": buffer_records(None, None,
                                                          IMAGENET_MEAN_RECORD_BYTES, local),
    }


def _onoff(part: Dict[str, Any]) -> str:
    return "on" if part["on"] else "off"


def summary_line(report: Optional[Dict[str, Any]] = None) -> str:
    """One line: versions, crop decode, CUDA, DALI, CPUs and default workers."""
    r = report or runtime_report()
    v = r["versions"]
    crop = "on" if r["crop_decode"]["on"] else "OFF (imagenet-seq-info says why)"
    return (f"imagenet_seq {v['imagenet_seq']}, torch {v['torch']}, crop decode {crop}, "
            f"CUDA {_onoff(r['cuda'])}, DALI {_onoff(r['dali'])}, {r['cpus']} CPUs, "
            f"default workers {r['default_workers']}")


def format_report(r: Dict[str, Any]) -> str:
    """The report as text a person reads."""
    v = r["versions"]
    lines = ["imagenet_seq runtime report", "",
             "versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in v), ""]
    rows: List[tuple] = [("crop decode", r["crop_decode"]), ("prctl", r["prctl"]),
                         ("DALI", r["dali"]), ("CUDA", r["cuda"])]
    for name, part in rows:
        lines.append(f"{name:<12} {_onoff(part):<4} {part['why']}")
    from imagenet_seq.plan.shuffle import IMAGENET_MEAN_RECORD_BYTES

    gib = r["default_buffer_bytes"] / (1 << 30)
    lines += ["",
              f"CPUs usable by this process: {r['cpus']}; ranks on this machine: "
              f"{r['ranks_on_this_machine']} (LOCAL_WORLD_SIZE)",
              f"Loader defaults: num_workers={r['default_workers']} (CPUs / ranks), shuffle "
              f"buffer {gib:.2f} GiB per rank = ~{r['default_buffer_records_imagenet']:,} "
              f"records of {IMAGENET_MEAN_RECORD_BYTES // 1000} KB (ImageNet's mean)"]
    return "\n".join(lines)


def _splits_at(root: str) -> List[str]:
    """The splits ROOT holds: a file's own split, else every split with a file or manifest."""
    from imagenet_seq import format as fmt
    from imagenet_seq.format import manifest as mf

    if not os.path.exists(root):
        raise FileNotFoundError(f"{root} does not exist; pass the output folder of "
                                "preprocess_sequential.py, one .lmdb file or a manifest")
    if os.path.isfile(root):
        if root.endswith(".manifest.json"):
            return [mf.read_manifest(root)["split"]]
        env = fmt.open_env(root)
        try:
            with env.begin(buffers=True) as txn:
                return [fmt.read_metadata(txn, root).split]
        finally:
            env.close()
    return [s for s in fmt.SPLITS if any(os.path.exists(os.path.join(root, n)) for n in (
        mf.manifest_filename(s), fmt.split_filename(s)))]


def splits_report(root: str, shard_dirs: Sequence[str] = ()) -> Dict[str, Any]:
    """Per split under ``root`` (a folder, one .lmdb file or a manifest): its manifest (None:
    one file), shards (count, folders, per shard: path, records, JPEG bytes, file bytes),
    records and bytes; or ``{"error": ...}`` naming what is missing or damaged and the fix."""
    from imagenet_seq.format import manifest as mf

    try:
        splits = _splits_at(root)
    except (ValueError, OSError) as e:
        return {"-": {"error": str(e)}}
    out: Dict[str, Any] = {}
    for split in splits:
        try:
            sp = mf.open_split(root, split, shard_dirs)
            rows = [{"index": s.index, "path": s.path, "records": s.records, "bytes": s.bytes,
                     "file_bytes": os.path.getsize(s.path)} for s in sp.shards]
        except (ValueError, OSError) as e:  # FileNotFoundError, DamagedFile
            out[split] = {"error": str(e)}
            continue
        folders = list(dict.fromkeys(os.path.dirname(os.path.abspath(r["path"])) for r in rows))
        out[split] = {"manifest": sp.manifest, "shards": len(rows), "folders": folders,
                      "records": sp.num_records, "bytes": sum(r["bytes"] for r in rows),
                      "file_bytes": sum(r["file_bytes"] for r in rows), "rows": rows}
    return out


def format_splits(root: str, splits: Dict[str, Any]) -> str:
    """:func:`splits_report` as text a person reads."""
    lines = [f"splits in {root}:"]
    for split, r in splits.items():
        if "error" in r:
            lines.append(f"  {split}: ERROR {r['error']}")
            continue
        size = f"{r['records']:,} records, {r['bytes'] / 1e9:.3f} GB of images " \
               f"({r['file_bytes'] / 1e9:.3f} GB of files)"
        if r["manifest"] is None:
            path = r["rows"][0]["path"]
            m = re.search(r"-(\d{5})-of-(\d{5})\.lmdb$", path)
            what = (f"shard {int(m.group(1))} of {int(m.group(2))} (alone)" if m else
                    "one file")
            lines.append(f"  {split}: {what} {path}, {size}")
            continue
        lines.append(f"  {split}: {r['shards']} shards in {len(r['folders'])} folder"
                     f"{'s' if len(r['folders']) > 1 else ''} ({', '.join(r['folders'])}), "
                     f"{size}; manifest {r['manifest']}")
        lines += [f"    {s['index']:>5}  {s['records']:>10,} records  {s['bytes'] / 1e9:8.3f} GB"
                  f"  {s['path']}" for s in r["rows"]]
    if len(lines) == 1:
        lines.append("  none (no ILSVRC-<split>.lmdb or ILSVRC-<split>.manifest.json); convert "
                     "with preprocess_sequential.py")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: print the report (``--json``: one object); 0, or 1 when a split under
    ROOT is damaged or missing a shard."""
    p = argparse.ArgumentParser(prog="imagenet-seq-info", description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?",
                   help="also show the splits converted here: an output folder of "
                        "preprocess_sequential.py, one .lmdb file or a manifest")
    p.add_argument("--shard-dirs", metavar="DIR,...",
                   help="folders where shards the manifest places elsewhere are now")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    r = runtime_report()
    splits = None
    if args.root is not None:
        splits = splits_report(args.root, [d for d in (args.shard_dirs or "").split(",") if d])
        r["splits"] = splits
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(format_report(r) + ("" if splits is None else "\n\n" + format_splits(args.root,
                                                                                  splits)))
    return 1 if splits and any("error" in v for v in splits.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
