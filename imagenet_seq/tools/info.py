"""``imagenet-seq-info`` / ``python -m imagenet_seq``: what this installation can do, and why not.

Optional parts install silently or not at all (the crop-decode C extension needs the libjpeg-turbo
headers at ``pip install`` time; python-prctl needs libcap headers; DALI and CUDA need their
wheels and a driver). This report says which are on, which are off and the command that turns
them on, plus the versions and the Loader's defaults on this machine (decode workers, shuffle
buffer). ``summary_line()`` is its one-line form, printed by the demo and the bench.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional

PRCTL_PIP = 'apt-get install libcap-dev && pip install "imagenet_seq[prctl]"'
DALI_PIP = 'pip install "imagenet_seq[dali]"'

__all__ = ["crop_decode_status", "runtime_report", "summary_line", "format_report", "main"]


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


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: print the report (``--json``: one object); always 0."""
    p = argparse.ArgumentParser(prog="imagenet-seq-info", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    r = runtime_report()
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
