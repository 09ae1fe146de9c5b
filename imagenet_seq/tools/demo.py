"""``imagenet-seq-demo``: the main job end to end on a sample made from real photographs.

1. build a small ImageNet-like ImageFolder from the photographs scikit-image ships;
2. convert it with ``preprocess_sequential.py`` into sequential LMDBs;
3. train ``examples/imagenet/main.py`` (tiny CNN, CPU) for an epoch from those LMDBs, validating;
4. evaluate the checkpoint it wrote (the ``--evaluate --resume`` path);
then print the measured training throughput and the hours a full ImageNet run (1,281,167 images x
90 epochs) would take at that rate.

The example is a standalone script, not part of the package (users copy and edit it), so the demo
loads it by path: ``--example``, else ``examples/imagenet/main.py`` of the source checkout this
package is installed from (``pip install -e .``), else a copy installed under
``<prefix>/share/imagenet_seq/``. Without any of them it stops with a message saying so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from imagenet_seq.convert import cli as preprocess_cli
from imagenet_seq.tools.info import summary_line
from imagenet_seq.tools.sample import PHOTOS, make_sample_imagefolder

__all__ = ["IMAGENET_TRAIN_IMAGES", "IMAGENET_EPOCHS", "find_example", "load_example",
           "full_run_hours", "parse_args", "run", "main"]

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_EPOCHS = 90
_REL = os.path.join("examples", "imagenet", "main.py")


def find_example(path: Optional[str] = None) -> str:
    """Path of the example's ``main.py`` (see the module docstring for the search order).

    Raises:
        FileNotFoundError: not found; the message names the places looked at and the fix.
    """
    if path:
        if os.path.isdir(path):
            path = os.path.join(path, "main.py")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--example {path!r}: no such file; pass the path of "
                                    f"{_REL} in an imagenet_seq checkout")
        return path
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [os.path.join(here, _REL),
                  os.path.join(sys.prefix, "share", "imagenet_seq", _REL)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"the demo runs {_REL} from the imagenet_seq source checkout, and it is not at "
        f"{' or '.join(candidates)}: clone the repository and install it with `pip install -e .`, "
        "or pass --example /path/to/examples/imagenet/main.py")


def load_example(path: str):
    """Import the example script at ``path`` as a module (its folder joins sys.path)."""
    spec = importlib.util.spec_from_file_location("imagenet_seq_example_main", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def full_run_hours(img_per_s: float, images: int = IMAGENET_TRAIN_IMAGES,
                   epochs: int = IMAGENET_EPOCHS) -> float:
    """Hours to train ``epochs`` over ``images`` at ``img_per_s`` (validation not included)."""
    return images * epochs / img_per_s / 3600.0 if img_per_s > 0 else float("inf")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The demo's command line; every option has a default that runs in about a minute."""
    p = argparse.ArgumentParser(prog="imagenet-seq-demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", help="where the sample, LMDBs and checkpoint go "
                   "(default: a new temp dir, kept so the printed commands can be re-run)")
    p.add_argument("--classes", type=int, default=len(PHOTOS),
                   help=f"sample classes, one per photograph (at most {len(PHOTOS)})")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decode workers")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--example", help="path of examples/imagenet/main.py (default: the checkout)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    for name in ("classes", "train_per_class", "val_per_class", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}; must be >= 1")
    return args


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The four steps; returns the measured numbers (see ``main`` for what is printed)."""
    example = load_example(find_example(args.example))
    work = args.workdir or tempfile.mkdtemp(prefix="imagenet_seq_demo_")
    src, dst, out = (os.path.join(work, d) for d in ("imagefolder", "lmdb", "run"))
    say = (lambda *a: None) if args.json else print
    say(f"runtime: {summary_line()}")
    say(f"1/4 building a sample ImageFolder from real photographs in {src}")
    t0 = time.perf_counter()
    classes = make_sample_imagefolder(src, args.train_per_class, args.val_per_class,
                                      num_classes=args.classes)
    n_train, n_val = len(classes) * args.train_per_class, len(classes) * args.val_per_class
    say(f"    {len(classes)} classes, {n_train} train + {n_val} val JPEGs "
        f"({time.perf_counter() - t0:.1f} s)")
    say(f"2/4 python preprocess_sequential.py {src} {dst}")
    convert = [src, dst, "--overwrite", "--no-progress"]
    rc = _quiet(preprocess_cli.main, convert) if args.json else preprocess_cli.main(convert)
    if rc != 0:
        raise RuntimeError(f"preprocess_sequential.py exited with {rc}")
    # one progress line per epoch (-p = steps per epoch): its img/s is then the epoch's, the
    # figure the result quotes, so the run shows one throughput
    steps = -(-n_train // args.batch_size)
    common = [dst, "-a", "tiny", "-b", str(args.batch_size), "-j", str(args.workers),
              "--image-size", str(args.image_size), "--lr", "0.05", "-p", str(steps)]
    train_argv = common + ["--epochs", str(args.epochs), "--output-dir", out]
    say(f"3/4 python {_REL} {' '.join(train_argv)}")
    trained = _quiet(example.run, train_argv) if args.json else example.run(train_argv)
    eval_argv = common + ["--evaluate", "--resume", os.path.join(out, "checkpoint.pth")]
    say(f"4/4 python {_REL} {' '.join(eval_argv)}")
    evaluated = _quiet(example.run, eval_argv) if args.json else example.run(eval_argv)
    # the figure of the example's "Epoch 1/1 done" line: every train step counted, start-up
    # included (one throughput per run; on a split this small the first step holds the read of
    # the whole split into the shuffle buffer, so ImageNet's projection is on the safe side)
    rate = float(trained["train_epoch_img_per_s"])
    return {"workdir": work, "classes": len(classes), "train_images": n_train,
            "val_images": n_val, "train_img_per_s": rate, "data_wait": trained["data_wait"],
            "val_top1": evaluated["val"]["top1"], "val_top5": evaluated["val"]["top5"],
            "full_imagenet_hours": full_run_hours(rate), "cpu_cores": os.cpu_count()}


def _quiet(fn, *a):
    """Call ``fn`` with its prints sent to stderr (keeps stdout one JSON object)."""
    old, sys.stdout = sys.stdout, sys.stderr
    try:
        return fn(*a)
    finally:
        sys.stdout = old


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: 0 on success, 2 with a one-line message when something is missing."""
    args = parse_args(argv)
    try:
        r = run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"imagenet-seq-demo: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"\nResult on this machine ({r['cpu_cores']} CPU cores, tiny CNN, "
          f"{args.image_size}px crops):")
    print(f"  training throughput   {r['train_img_per_s']:,.0f} images/s over the epoch "
          f"(the 'Epoch 1/1 done' line; data wait {100 * r['data_wait']:.0f}% of step time)")
    print(f"  validation            top-1 {r['val_top1']:.1f}%, top-5 {r['val_top5']:.1f}% "
          f"on {r['val_images']} images, {r['classes']} classes")
    print(f"  full ImageNet run     {IMAGENET_TRAIN_IMAGES:,} images x {IMAGENET_EPOCHS} epochs "
          f"at this rate: {r['full_imagenet_hours']:,.1f} hours")
    print("  (this is the rate of this machine's CPU running decode and a tiny model together; "
          "on a GPU machine\n   the model and the decode workers set it. For comparison, "
          "reading ImageNet's JPEGs as files\n   from one HDD is limited to ~40-75 images/s, "
          "i.e. ~430-800 hours for the same run.)")
    print(f"  files: {r['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
